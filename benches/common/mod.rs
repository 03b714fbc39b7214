//! What the standalone benches share: their command line (`--run` and `--flag N`) and the
//! process figures they read from /proc (CPU time, RSS). Each bench declares `mod common;` and uses
//! part of it.
#![allow(dead_code)]

/// The arguments after cargo bench's own `--bench`, or `None` (after printing `usage`) when
/// `--run` is not among them: a plain `cargo bench` must not start a long measurement.
pub fn run_args(usage: &str) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.iter().any(|a| a == "--run") {
        Some(args)
    } else {
        eprintln!("usage: {usage}");
        None
    }
}

/// The text after `flag`, if given.
pub fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The number after `flag`, or `default`.
pub fn number(args: &[String], name: &str, default: usize) -> usize {
    flag(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of the processes (all their threads).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| stat_cpu_seconds(&stat))
        .sum()
}

/// User + system CPU seconds of this process.
pub fn self_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .map(|s| stat_cpu_seconds(&s))
        .unwrap_or(0.0)
}

/// utime + stime (fields 14 and 15, in USER_HZ = 100 ticks per second on Linux).
fn stat_cpu_seconds(stat: &str) -> f64 {
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Sum of VmRSS (kB) of the processes.
pub fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| status_rss_kb(&format!("/proc/{pid}/status")))
        .sum()
}

/// VmRSS (kB) of this process.
pub fn self_rss_kb() -> u64 {
    status_rss_kb("/proc/self/status")
}

fn status_rss_kb(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}
