//! `lb`: the agent and operator CLI; see `lb --help`.

fn main() -> std::process::ExitCode {
    lb::cli::main()
}
