//! The operator CLI: one module per subcommand; doc comments are the help text.

mod backend;
mod check;
mod control;
mod docs;
mod http;
mod reload;
mod run;
mod status;
mod unload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An XDP layer-4 load balancer: balances TCP and UDP services across
/// healthy backends, in the kernel.
#[derive(Debug, Parser)]
#[command(name = "lb", version)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `lb=debug` (also from LB_LOG).
    #[arg(long, global = true, env = "LB_LOG", default_value = "info")]
    log: String,
    /// Log lines as text, or as one JSON object per event with its fields
    /// (vip, backend, reason, generation, ...) for a log pipeline.
    #[arg(long, global = true, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `LEVEL message key=value ...`, for people.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (the
    /// message and every field), for programs.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::Args),
    Check(check::Args),
    Status(status::Args),
    Unload(unload::Args),
    Backend(backend::Args),
    Reload(reload::Args),
    #[command(hide = true)]
    GenerateDocs(docs::Args),
}

/// Parses arguments, runs the subcommand, and turns errors into an exit code
/// with the whole cause chain printed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::run(args),
        Command::Status(args) => status::run(args),
        Command::Unload(args) => unload::run(args),
        Command::Backend(args) => backend::run(args),
        Command::Reload(args) => reload::run(args),
        Command::GenerateDocs(args) => docs::run(&args, <Cli as clap::CommandFactory>::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lb: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in log files and journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The man pages and completions come out of the CLI's definitions.
    #[test]
    fn generate_docs_writes_man_pages_and_completions() {
        let out = std::env::temp_dir().join(format!("lb-docs-test-{}", std::process::id()));
        let args = docs::Args::for_test(out.clone());
        docs::run(&args, <Cli as clap::CommandFactory>::command()).expect("generated");
        let page = std::fs::read_to_string(out.join("man1/lb-status.1")).expect("lb-status.1");
        assert!(page.contains("\\-\\-rates") && page.contains("\\-\\-watch"), "{page}");
        assert!(out.join("man1/lb.1").exists() && !out.join("man1/lb-generate-docs.1").exists());
        let bash = std::fs::read_to_string(out.join("completions/lb.bash")).expect("bash completion");
        assert!(bash.contains("--log-format") && bash.contains("drain"), "{bash}");
        assert!(out.join("completions/_lb").exists() && out.join("completions/lb.fish").exists());
        let _ = std::fs::remove_dir_all(&out);
    }

    /// `lb status` asks where `lb run` listens by default.
    #[test]
    fn lb_status_defaults_to_the_agents_admin_address() {
        let cli = Cli::try_parse_from(["lb", "status"]).expect("parses");
        let Command::Status(args) = cli.command else { panic!("not status: {cli:?}") };
        assert_eq!(args.admin, crate::config::DEFAULT_ADMIN_LISTEN);
        assert_ne!(args.admin.port(), 9100, "node_exporter's port");
    }
}
