//! Mutated config files for the config parser's fuzz test
//! (`tests/tests/config_fuzz.rs`, issue 12).
//!
//! Seeds are real configs: `examples/lb.toml`, the TOML literals of the
//! parser's own unit tests, and the README's `toml` fragments spliced into a
//! minimal config. [`ConfigGenerator`] picks one and applies 1 to 4
//! line-level mutations: delete, duplicate, swap or move lines; replace a
//! value with one of another type, an out-of-range number, a bad duration or
//! a bad address; add or misspell a key; splice in a line of another seed;
//! rename a section header; insert odd characters; truncate anywhere.
//! Text only: the test judges what the parser makes of it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Rng;

/// A config to start from: the smallest file the parser accepts, so that
/// README fragments spliced into it are read in a valid context.
pub const MINIMAL: &str = "[agent]\ninterfaces = [\"eth0\"]\n\n[[vip]]\nname = \"web\"\nlisten = \
                           \"198.18.0.100:80\"\n\n[[vip.backend]]\naddress = \"198.18.2.11:8080\"\n";

/// Values of every type, and values each key's rules refuse: out-of-range
/// numbers, bad durations, bad addresses, bad prefixes, odd strings.
const VALUES: &[&str] = &[
    // other types
    "true",
    "false",
    "1.5",
    "-0.0",
    "nan",
    "inf",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "[]",
    "[1, 2]",
    "[\"eth0\", 1]",
    "[[]]",
    "{}",
    "{ a = 1 }",
    "\"\"",
    "''",
    "'''\nmulti\nline'''",
    // numbers at and past every bound
    "0",
    "-1",
    "1",
    "2",
    "250",
    "251",
    "252",
    "253",
    "255",
    "1023",
    "1024",
    "65535",
    "65536",
    "65537",
    "131071",
    "10000",
    "10001",
    "10000000",
    "10000001",
    "67108864",
    "67108865",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "0x10",
    "0o17",
    "0b101",
    "1_000",
    // durations
    "\"0s\"",
    "\"0ms\"",
    "\"1ns\"",
    "\"99ms\"",
    "\"100ms\"",
    "\"1s\"",
    "\"1.5s\"",
    "\"-1s\"",
    "\"1\"",
    "\"ms\"",
    "\"2 s\"",
    "\"1h 1s\"",
    "\"3601s\"",
    "\"65535s\"",
    "\"65536s\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999999h\"",
    "\"300000000000y\"",
    // addresses
    "\"198.18.0.100\"",
    "\"198.18.0.100:0\"",
    "\"198.18.0.100:65536\"",
    "\"198.18.0.100:-1\"",
    "\"256.1.1.1:80\"",
    "\"0.0.0.0:80\"",
    "\"0.1.2.3:80\"",
    "\"127.0.0.1:80\"",
    "\"224.0.0.1:80\"",
    "\"255.255.255.255:80\"",
    "\"240.0.0.1:80\"",
    "\"[2001:db8::1]:80\"",
    "\"2001:db8::1:80\"",
    "\"[2001:db8::1]\"",
    "\"[fe80::1]:80\"",
    "\"[fe80::1%2]:80\"",
    "\"[::ffff:198.18.0.1]:80\"",
    "\"[::198.18.0.1]:80\"",
    "\"[::1]:80\"",
    "\"[ff02::1]:80\"",
    "\"[::]:80\"",
    "\"198.18.2.11:8080\"",
    "\"198.18.0.100:80\"",
    "\"localhost:80\"",
    // prefixes, names, paths, enums
    "\"198.18.9.0/24\"",
    "\"198.18.9.1/24\"",
    "\"198.18.9.0/33\"",
    "\"2001:db8::/129\"",
    "\"/0\"",
    "\"/24\"",
    "\"/33\"",
    "\"/129\"",
    "\"/\"",
    "\"address\"",
    "\"eth0\"",
    "\"eth0 \"",
    "\"a-name-that-is-far-too-long-for-an-interface\"",
    "\".\"",
    "\"..\"",
    "\"a/b\"",
    "\"/\"",
    "\"/health\"",
    "\"health\"",
    "\"/a b\"",
    "\"relative/path\"",
    "\"/sys/fs/bpf/lb\"",
    "\"200-399\"",
    "\"399-200\"",
    "\"99\"",
    "\"600\"",
    "\"200-\"",
    "\"-\"",
    "\"tcp\"",
    "\"udp\"",
    "\"icmp\"",
    "\"http\"",
    "\"none\"",
    "\"maglev\"",
    "\"source-hash\"",
    "\"round-robin\"",
    "\"native\"",
    "\"generic\"",
    "\"offload\"",
    "\"drop\"",
    "\"rst\"",
    "\"keep\"",
    "\"reschedule\"",
    "\"\\u0000\"",
    "\"\\n\"",
    "\"é\"",
    "\"web\"",
    "\"dns\"",
];

/// Keys that are not the parser's, and misspellings of its own.
const UNKNOWN_KEYS: &[&str] =
    &["typo", "interface", "listen_", "Weight", "backends", "health-check", "vips", "agent2", "\"quoted.key\"", "\"\""];

/// Section headers to rename others to, or to insert.
const HEADERS: &[&str] = &[
    "[agent]",
    "[[agent]]",
    "[announce]",
    "[[vip]]",
    "[vip]",
    "[[vip.backend]]",
    "[vip.backend]",
    "[vip.health_check]",
    "[[vip.health_check]]",
    "[vip.limits]",
    "[vip.timeouts]",
    "[vip.backend.extra]",
    "[other]",
    "[agent.sub]",
    "[vip.health_check.x]",
];

/// Odd text to insert anywhere.
const NOISE: &[&str] = &["#", "=", "[", "]", "\"", "'", "\\", "\0", "\t", "\r", "\u{feff}", "é", "{", "}", ",", "\n"];

/// The seed configs, read from the repository (`repo` is its root).
///
/// # Errors
///
/// When a file cannot be read or holds no config.
pub fn seeds(repo: &Path) -> anyhow::Result<Vec<String>> {
    let read = |rel: &str| -> anyhow::Result<String> {
        let path: PathBuf = repo.join(rel);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let mut seeds = vec![MINIMAL.to_owned(), read("examples/lb.toml")?];
    seeds.extend(raw_literals(&read("lb-userspace/src/config/tests.rs")?).filter(|t| t.contains("[agent]")));
    for fragment in fenced_blocks(&read("README.md")?, "toml") {
        if fragment.contains("[agent]") {
            seeds.push(fragment);
        } else {
            // A fragment of one section, e.g. `[vip.limits]`: it belongs
            // after the VIP's keys, before its backends.
            seeds.push(MINIMAL.replace("[[vip.backend]]", &format!("{fragment}\n[[vip.backend]]")));
        }
    }
    anyhow::ensure!(seeds.len() > 3, "found only {} seed configs", seeds.len());
    Ok(seeds)
}

/// The bodies of `r#"..."#` literals in Rust source.
fn raw_literals(source: &str) -> impl Iterator<Item = String> + '_ {
    source.split("r#\"").skip(1).filter_map(|rest| rest.split_once("\"#").map(|(body, _)| body.to_owned()))
}

/// The bodies of the ```` ```lang ```` blocks of a Markdown text.
fn fenced_blocks(markdown: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut current, fence) {
            (None, Some(info)) if info.trim() == lang => current = Some(String::new()),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some(body), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// One mutated config and how it was made.
#[derive(Debug, Clone)]
pub struct ConfigCase {
    /// The file's text.
    pub text: String,
    /// The seed's index and the mutations, e.g. `seed 2 | delete line 7 | value 3 = "0s"`.
    pub what: String,
}

/// The reproducible sequence of mutated configs from one seed.
#[derive(Debug, Clone)]
pub struct ConfigGenerator {
    rng: Rng,
    seeds: Vec<String>,
    /// Every line of every seed, for splicing.
    lines: Vec<String>,
}

impl ConfigGenerator {
    /// Mutations of `seeds` from `seed`.
    #[must_use]
    pub fn new(seed: u64, seeds: Vec<String>) -> Self {
        let lines = seeds.iter().flat_map(|s| s.lines().map(str::to_owned)).filter(|l| !l.trim().is_empty()).collect();
        ConfigGenerator { rng: Rng::new(seed), seeds, lines }
    }

    /// The next case: a seed and 1 to 4 mutations (1 in 20 cases: none, so
    /// every seed is also checked as written).
    pub fn next_case(&mut self) -> ConfigCase {
        let index = self.rng.below(self.seeds.len());
        let mut lines: Vec<String> = self.seeds[index].lines().map(str::to_owned).collect();
        let mut what = format!("seed {index}");
        let mutations = if self.rng.chance(5) { 0 } else { 1 + self.rng.below(4) };
        let mut truncate_at = None;
        for _ in 0..mutations {
            if self.rng.chance(8) {
                truncate_at = Some(self.rng.next_u64());
                continue;
            }
            let done = self.mutate(&mut lines);
            what.push_str(" | ");
            what.push_str(&done);
        }
        let mut text = lines.join("\n");
        text.push('\n');
        if let Some(r) = truncate_at {
            let mut at = (r % (text.len() as u64 + 1)) as usize;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.truncate(at);
            what.push_str(&format!(" | truncate at byte {at}"));
        }
        ConfigCase { text, what }
    }

    /// Applies one mutation to `lines` and says which.
    fn mutate(&mut self, lines: &mut Vec<String>) -> String {
        if lines.is_empty() {
            lines.push(self.rng.pick(&self.lines).clone());
            return "splice into empty".to_owned();
        }
        let i = self.rng.below(lines.len());
        match self.rng.below(12) {
            0 => {
                lines.remove(i);
                format!("delete line {}", i + 1)
            }
            1 => {
                let line = lines[i].clone();
                lines.insert(i, line);
                format!("duplicate line {}", i + 1)
            }
            2 => {
                let j = self.rng.below(lines.len());
                lines.swap(i, j);
                format!("swap lines {} and {}", i + 1, j + 1)
            }
            3 => {
                let line = lines.remove(i);
                let j = self.rng.below(lines.len() + 1);
                lines.insert(j, line);
                format!("move line {} to {}", i + 1, j + 1)
            }
            4..=6 => self.replace_value(lines),
            7 => {
                let key = *self.rng.pick(UNKNOWN_KEYS);
                let value = *self.rng.pick(VALUES);
                lines.insert(i, format!("{key} = {value}"));
                format!("insert `{key} = {value}` at line {}", i + 1)
            }
            8 => self.misspell_key(lines),
            9 => {
                let line = self.rng.pick(&self.lines).clone();
                lines.insert(i, line.clone());
                format!("splice `{line}` at line {}", i + 1)
            }
            10 => self.change_header(lines),
            _ => {
                let noise = *self.rng.pick(NOISE);
                let line = &mut lines[i];
                let mut at = self.rng.below(line.len() + 1);
                while !line.is_char_boundary(at) {
                    at -= 1;
                }
                line.insert_str(at, noise);
                format!("insert {noise:?} in line {} at {at}", i + 1)
            }
        }
    }

    /// Replaces the value of a `key = value` line with one from [`VALUES`].
    fn replace_value(&mut self, lines: &mut [String]) -> String {
        let Some(i) = self.pick_line(lines, |l| key_of(l).is_some()) else { return "no value to replace".to_owned() };
        let key = key_of(&lines[i]).unwrap_or_default().to_owned();
        let value = *self.rng.pick(VALUES);
        lines[i] = format!("{key} = {value}");
        format!("line {}: {key} = {value}", i + 1)
    }

    /// Changes one character of a key, so it is unknown (or another key).
    fn misspell_key(&mut self, lines: &mut [String]) -> String {
        let Some(i) = self.pick_line(lines, |l| key_of(l).is_some()) else { return "no key to misspell".to_owned() };
        let key = key_of(&lines[i]).unwrap_or_default().to_owned();
        let mut chars: Vec<char> = key.chars().collect();
        let at = self.rng.below(chars.len());
        chars[at] = *self.rng.pick(&['_', 'x', 'A', '-', '1']);
        let new: String = chars.into_iter().collect();
        let rest = lines[i].split_once('=').map_or("", |(_, v)| v).to_owned();
        lines[i] = format!("{new} ={rest}");
        format!("line {}: key {key} -> {new}", i + 1)
    }

    /// Renames a section header, or inserts one.
    fn change_header(&mut self, lines: &mut Vec<String>) -> String {
        let header = (*self.rng.pick(HEADERS)).to_owned();
        match self.pick_line(lines, |l| l.trim_start().starts_with('[')) {
            Some(i) if self.rng.chance(60) => {
                let old = std::mem::replace(&mut lines[i], header.clone());
                format!("line {}: header {old} -> {header}", i + 1)
            }
            _ => {
                let i = self.rng.below(lines.len() + 1);
                lines.insert(i, header.clone());
                format!("insert {header} at line {}", i + 1)
            }
        }
    }

    /// A random line for which `pred` holds, if any does.
    fn pick_line(&mut self, lines: &[String], pred: impl Fn(&str) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..lines.len()).filter(|&i| pred(&lines[i])).collect();
        (!candidates.is_empty()).then(|| candidates[self.rng.below(candidates.len())])
    }
}

/// The key of a `key = value` line (not a comment or header).
fn key_of(line: &str) -> Option<&str> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') || trimmed.starts_with('[') {
        return None;
    }
    let (key, _) = trimmed.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_blocks_and_raw_literals_are_found() {
        let md = "text\n```toml\na = 1\n```\n```sh\nls\n```\n```toml\nb = 2\n```\n";
        assert_eq!(fenced_blocks(md, "toml"), ["a = 1\n", "b = 2\n"]);
        let rs = "const A: &str = r#\"\n[agent]\n\"#; let b = r#\"x\"#;";
        assert_eq!(raw_literals(rs).collect::<Vec<_>>(), ["\n[agent]\n", "x"]);
    }

    #[test]
    fn the_same_seed_gives_the_same_cases() {
        let seeds = vec![MINIMAL.to_owned()];
        let mut a = ConfigGenerator::new(7, seeds.clone());
        let mut b = ConfigGenerator::new(7, seeds);
        for _ in 0..200 {
            let (x, y) = (a.next_case(), b.next_case());
            assert_eq!((x.text, x.what), (y.text, y.what));
        }
    }
}
