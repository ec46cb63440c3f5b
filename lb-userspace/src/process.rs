//! The agent's own process, read from `/proc` at scrape time: the
//! `process_*` metrics every Prometheus client library exports, without a
//! crate for them.

use std::io;

/// What `/proc` says about this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_memory_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: u64,
    /// When the process started, in Unix seconds.
    pub start_time_seconds: f64,
}

/// Reads this process's figures.
///
/// # Errors
/// If `/proc` cannot be read or parsed.
pub fn read() -> io::Result<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let boot = boot_time_seconds(&std::fs::read_to_string("/proc/stat")?)?;
    let open_fds = u64::try_from(std::fs::read_dir("/proc/self/fd")?.count()).unwrap_or(u64::MAX);
    // SAFETY: sysconf only reads a constant.
    let ticks = f64::from(u32::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1));
    // SAFETY: as above.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let parsed = parse_stat(&stat).ok_or_else(|| invalid("/proc/self/stat"))?;
    let (vm_pages, rss_pages) = parse_statm(&statm).ok_or_else(|| invalid("/proc/self/statm"))?;
    Ok(ProcessStats {
        cpu_seconds: (parsed.utime + parsed.stime) as f64 / ticks,
        resident_memory_bytes: rss_pages.saturating_mul(page),
        virtual_memory_bytes: vm_pages.saturating_mul(page),
        open_fds,
        max_fds: max_fds(),
        start_time_seconds: boot as f64 + parsed.starttime as f64 / ticks,
    })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

/// The fields of `/proc/self/stat` we use, in clock ticks.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Since boot.
    starttime: u64,
}

/// Parses `/proc/PID/stat` (proc(5)). The command name, field 2, is in
/// parentheses and may hold spaces and parentheses itself, so fields are
/// counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state): field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
}

/// Parses `/proc/PID/statm`: total and resident pages.
fn parse_statm(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// The `btime` line of `/proc/stat`: boot time in Unix seconds.
fn boot_time_seconds(text: &str) -> io::Result<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
        .ok_or_else(|| invalid("the btime line of /proc/stat"))
}

fn max_fds() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let line = "1234 (lb (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 4200 1000 300 1844";
        assert_eq!(parse_stat(line), Some(Stat { utime: 250, stime: 50, starttime: 4200 }));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_reads_as_alive() {
        let p = read().expect("read /proc");
        assert!(p.resident_memory_bytes > 0 && p.open_fds > 0 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        assert!(p.start_time_seconds > 1e9 && p.start_time_seconds <= now + 1.0, "{p:?} at {now}");
    }
}
