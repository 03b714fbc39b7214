//! CI can never pass by skipping: every test that needs an outside tool skips through
//! `tests/common/skip.rs`, which fails under `CI`, and `.ci/run` installs every such tool.

#[path = "common/skip.rs"]
mod skip;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name() != Some(OsStr::new("fixtures")) {
                rust_files(&path, out);
            }
        } else if path.extension() == Some(OsStr::new("rs")) {
            out.push(path);
        }
    }
}

#[test]
fn ci_variable_turns_a_skip_into_a_failure() {
    assert!(skip::ci_value_means_ci(Some(OsStr::new("true"))));
    assert!(skip::ci_value_means_ci(Some(OsStr::new("1"))));
    assert!(!skip::ci_value_means_ci(None));
    assert!(!skip::ci_value_means_ci(Some(OsStr::new(""))));
    assert!(!skip::ci_value_means_ci(Some(OsStr::new("false"))));
}

#[test]
fn skip_fails_when_ci_is_set() {
    // The real helper, in the real environment: under CI it must panic, elsewhere return.
    let outcome = std::panic::catch_unwind(|| skip::skip("probe", "nothing is missing"));
    assert_eq!(outcome.is_err(), skip::running_in_ci());
}

#[test]
fn no_test_prints_skipped_except_through_the_ci_aware_helper() {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = Vec::new();
    rust_files(&tests, &mut files);
    assert!(files.len() > 5, "found the test files");
    let mut offenders = Vec::new();
    for file in files {
        if file.ends_with("common/skip.rs") || file.ends_with("no_silent_skips.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if !code.starts_with("//") && code.contains("SKIPPED") {
                offenders.push(format!("{}:{}: {}", file.display(), n + 1, code));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "print skips with common::skip (it fails under CI):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn ci_script_installs_every_tool_the_tests_need_and_tolerates_no_failed_install() {
    let script = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"))
        .expect(".ci/run");
    for tool in [
        "openssl",
        "redis-server",
        "systemd-analyze",
        "promtool",
        "sslyze",
        "fhir.resources",
        "dpkg-deb",
        "readelf",
    ] {
        assert!(script.contains(tool), ".ci/run does not install {tool}");
    }
    assert!(
        !script.contains("|| echo"),
        "an install failure in .ci/run must fail CI, not be echoed away"
    );
}
