//! The fuzzed config parser (issue 12): mutated TOML
//! ([`lb_tests::fuzz::config`]) through `Config::parse`, each result judged:
//!
//! - no panic;
//! - a rejection is one line that starts with the file's name, then either
//!   `LINE:COLUMN` inside the text (not TOML: no key to name) or a key whose
//!   last part is written in the file or is one of the parser's own keys
//!   (found in the seed configs), and a reason;
//! - the same text gives the same answer twice (the parser's hash maps are
//!   seeded per instance, so an order-dependent first error shows here);
//! - an accepted config keeps the rules it was checked against, and the
//!   control plane (`Balancer::new`) takes it.
//!
//! Needs no root. `LB_CONFIG_FUZZ_CASES` (default 5,000, a second or two)
//! and `LB_FUZZ_SEED` (default 1, so `cargo xtask test` is deterministic)
//! set the run; `cargo xtask fuzz --target config --cases N --seed S` runs
//! it longer; `LB_CONFIG_FUZZ_PRINT=1` prints every verdict. Failing inputs are written to `LB_FUZZ_OUT` (default
//! `target/fuzz-failures/`), one `.toml` file each.

use std::{
    collections::HashSet,
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::Instant,
};

use lb::config::{Config, ConfigError};
use lb_tests::fuzz::config::{ConfigCase, ConfigGenerator, seeds};

/// Cases per run unless `LB_CONFIG_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u64 = 5_000;
/// The seed `cargo xtask test` runs with.
const DEFAULT_SEED: u64 = 1;
/// Failures kept (and written out) per run.
const MAX_FAILURES: usize = 20;

#[test]
fn mutated_configs_are_accepted_or_rejected_naming_a_key() {
    let seed = env_number("LB_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_number("LB_CONFIG_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    eprintln!(
        "config fuzz: seed {seed}, {cases} cases (again: cargo xtask fuzz --target config --seed {seed} --cases {cases})"
    );
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = seeds(&repo).expect("seed configs");
    let vocabulary = vocabulary(&seeds);
    let mut generator = ConfigGenerator::new(seed, seeds);
    let started = Instant::now();
    let (mut accepted, mut failures) = (0_u64, Vec::new());
    for index in 0..cases {
        let case = generator.next_case();
        match judge(index, &case, &vocabulary) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(why) if failures.len() < MAX_FAILURES => failures.push((index, case, why)),
            Err(_) => {}
        }
    }
    eprintln!(
        "config fuzz: {cases} cases in {:.1?}: {accepted} accepted, {} rejected, {} failures",
        started.elapsed(),
        cases - accepted,
        failures.len()
    );
    if failures.is_empty() {
        return;
    }
    let dir = save(seed, &failures);
    let mut message =
        format!("{} configs broke an invariant (seed {seed}; inputs in {}):\n", failures.len(), dir.display());
    for (index, case, why) in failures.iter().take(5) {
        let _ = writeln!(message, "  #{index}: {why}\n    made: {}", case.what);
    }
    panic!("{message}");
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// Whether the case was accepted, or which invariant it broke.
fn judge(index: u64, case: &ConfigCase, vocabulary: &HashSet<String>) -> Result<bool, String> {
    let file = PathBuf::from(format!("fuzz/case-{index}.toml"));
    let first = parse(&case.text, &file)?;
    let again = parse(&case.text, &file)?;
    let (first_text, again_text) = (describe(&first), describe(&again));
    if first_text != again_text {
        return Err(format!("two parses differ: {first_text:?} then {again_text:?}"));
    }
    if std::env::var_os("LB_CONFIG_FUZZ_PRINT").is_some() {
        eprintln!("#{index}: {first_text:.200}");
    }
    match first {
        Ok(config) => check_accepted(&config).map(|()| true),
        Err(e) => check_rejected(&e, &file, &case.text, vocabulary).map(|()| false),
    }
}

/// `Config::parse`, with a panic turned into an error.
fn parse(text: &str, file: &Path) -> Result<Result<Config, ConfigError>, String> {
    catch_unwind(AssertUnwindSafe(|| Config::parse(text, file))).map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("the parser panicked: {what}")
    })
}

fn describe(result: &Result<Config, ConfigError>) -> String {
    match result {
        Ok(config) => format!("accepted {config:?}"),
        Err(e) => format!("rejected {e}"),
    }
}

/// The rules an accepted config was checked against still hold.
fn check_accepted(config: &Config) -> Result<(), String> {
    let agent = &config.agent;
    let rules = [
        (!agent.interfaces.is_empty(), "no interfaces"),
        (!config.vips.is_empty(), "no VIPs"),
        (agent.max_vips as usize >= config.vips.len(), "more VIPs than max_vips"),
        (config.vips.iter().all(|v| !v.backends.is_empty()), "a VIP without backends"),
        (config.vips.iter().all(|v| v.backends.len() < agent.ring_size as usize), "more backends than ring slots"),
        (
            config.vips.iter().all(|v| v.health_check.timeout <= v.health_check.interval),
            "a check timeout over its interval",
        ),
        (
            config.vips.iter().all(|v| v.backends.iter().all(|b| b.address.is_ipv4() == v.listen.is_ipv4())),
            "a backend of another family",
        ),
    ];
    if let Some((_, broken)) = rules.iter().find(|(holds, _)| !holds) {
        return Err(format!("accepted with {broken}"));
    }
    // The control plane re-checks the sizes ("validation should already have
    // refused these"): an accepted config must pass.
    lb::control::balancer::Balancer::new(config)
        .map(|_| ())
        .map_err(|e| format!("accepted, but the control plane refuses it: {e}"))
}

/// A rejection names the file, then a position or a key, then a reason.
fn check_rejected(e: &ConfigError, file: &Path, text: &str, vocabulary: &HashSet<String>) -> Result<(), String> {
    let line = e.to_string();
    if line.contains('\n') {
        return Err(format!("the error is not one line: {line:?}"));
    }
    let rest = line
        .strip_prefix(&format!("{}:", file.display()))
        .ok_or_else(|| format!("the error does not start with the file: {line:?}"))?;
    match e {
        ConfigError::Syntax { position, message, .. } => {
            let lines = text.lines().count() + 1;
            if position.line == 0 || position.line > lines || position.column == 0 {
                return Err(format!("position {position} is outside the text ({lines} lines): {line:?}"));
            }
            if message.trim().is_empty() {
                return Err(format!("a syntax error without a message: {line:?}"));
            }
            Ok(())
        }
        ConfigError::Invalid { key, reason, .. } => {
            if !rest.starts_with(&format!(" {key}: ")) || reason.trim().is_empty() {
                return Err(format!("not `FILE: KEY: REASON`: {line:?}"));
            }
            let named = match last_part(key) {
                Part::Bare(last) => !last.is_empty() && (vocabulary.contains(last) || text.contains(last)),
                // Only keys read from the file are quoted (escaped, so
                // they cannot be compared with its text).
                Part::Quoted(_) => true,
            };
            if !named {
                return Err(format!("the key {key:?} names nothing in the file or the parser's keys: {line:?}"));
            }
            Ok(())
        }
        ConfigError::Read { .. } => Err(format!("a read error from text: {line:?}")),
    }
}

/// The last dotted part of an error's key, without its `[N]` index or
/// `(NAME)`: `vip[2] (web).backend[1].weight` → `weight`. A VIP's name may
/// hold dots, so dots inside brackets and parentheses do not split; a key
/// the parser quoted (`agent."a.b"`) is returned unquoted, and must then
/// have been written in the file.
fn last_part(key: &str) -> Part<'_> {
    let (mut depth, mut start, mut in_quotes, mut escaped) = (0_i32, 0, false, false);
    for (i, c) in key.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            '.' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    let part = &key[start..];
    if let Some(inner) = part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
        return Part::Quoted(inner);
    }
    let part = part.split_once(" (").map_or(part, |(p, _)| p);
    Part::Bare(part.split_once('[').map_or(part, |(p, _)| p).trim())
}

/// What [`last_part`] found.
#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    /// A bare key: one of the parser's, or one written in the file.
    Bare(&'a str),
    /// A quoted key, as the parser escaped it.
    Quoted(&'a str),
}

/// Every key and section name the seed configs use: the parser's own keys.
fn vocabulary(seeds: &[String]) -> HashSet<String> {
    let mut words = HashSet::new();
    for line in seeds.iter().flat_map(|s| s.lines()) {
        let line = line.trim();
        if line.starts_with('[') {
            for part in line.trim_matches(|c| c == '[' || c == ']').split('.') {
                words.insert(part.trim().to_owned());
            }
        } else if let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            words.insert(key.trim().to_owned());
        }
    }
    words.remove("");
    words
}

/// Writes each failing config to a file of its own; returns the directory.
fn save(seed: u64, failures: &[(u64, ConfigCase, String)]) -> PathBuf {
    let dir = std::env::var_os("LB_FUZZ_OUT")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures"), PathBuf::from);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("config fuzz: cannot create {}: {e}", dir.display());
    }
    for (index, case, why) in failures {
        let path = dir.join(format!("config-{seed}-{index}.toml"));
        let text = format!("# seed {seed}, case {index}\n# made: {}\n# broke: {why}\n{}", case.what, case.text);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("config fuzz: cannot write {}: {e}", path.display());
        }
    }
    dir
}

#[test]
fn last_part_strips_indexes_and_names() {
    assert_eq!(last_part("vip[2] (web.v1).backend[1].weight"), Part::Bare("weight"));
    assert_eq!(last_part("vip[2] (web.v1)"), Part::Bare("vip"));
    assert_eq!(last_part("agent.interfaces[3]"), Part::Bare("interfaces"));
    assert_eq!(last_part("agent."), Part::Bare(""));
    assert_eq!(last_part("agent.\"a.b\""), Part::Quoted("a.b"));
    assert_eq!(last_part("agent.\"a\\\".b\""), Part::Quoted("a\\\".b"));
}
