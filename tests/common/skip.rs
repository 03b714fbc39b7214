//! Skipping a test that needs a tool this machine lacks, without letting CI pass by skipping.
//!
//! On a developer's machine a missing tool (openssl, redis-server, sslyze, systemd-analyze,
//! promtool, dpkg-deb, a Python module) prints SKIPPED loudly and the test passes. When the
//! environment variable `CI` is set (as `.ci/run` runs), the same skip is a failure: `.ci/run`
//! installs every tool, so a skip there means a broken install, and a green CI must mean every
//! test ran.
#![allow(dead_code)] // each test crate uses only some of these

/// Whether `CI` is set to something other than empty, `0` or `false`.
pub fn running_in_ci() -> bool {
    ci_value_means_ci(std::env::var_os("CI").as_deref())
}

/// The decision behind [`running_in_ci`], separated so it can be tested without touching the
/// process environment.
pub fn ci_value_means_ci(value: Option<&std::ffi::OsStr>) -> bool {
    match value.and_then(|v| v.to_str()) {
        None => value.is_some(),
        Some(v) => !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"),
    }
}

/// Skips `test` because of `why` (what is missing and how to install it): prints
/// `*** SKIPPED test: why ***` and returns on a developer machine; panics under CI.
#[track_caller]
pub fn skip(test: &str, why: &str) {
    if running_in_ci() {
        panic!("{test} would be SKIPPED under CI: {why}. .ci/run must install it; CI never skips");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether `program arg` runs and exits 0 (the usual "is it installed" probe).
pub fn tool_runs(program: &str, arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
