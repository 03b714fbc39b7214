//! The sslyze TLS scan (`scripts/tls-scan.sh`, docs/security.md §4) against the binary this build
//! made: the script starts it on loopback with a throwaway openssl PKI, scans it with sslyze with
//! and without a client certificate, and exits 0 only when every check passes. `tls_scan.rs`
//! checks the same properties without a scanner; this test is the scanner's view of them.
//!
//! Needs `sslyze` (the PyPI package) and `openssl` on PATH; without them it says SKIPPED loudly
//! (`.ci/run` installs both; under CI a skip fails, tests/common/skip.rs).

#[path = "common/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The checks the summary must list, each with a PASS (the requirements first).
const REQUIREMENTS: &[&str] = &[
    "protocols",
    "cipher-suites",
    "insecure-renegotiation",
    "client-renegotiation",
    "compression",
    "client-certificate",
    "heartbleed",
    "robot",
    "ccs-injection",
    "fallback-scsv",
    "session-resumption",
    "elliptic-curves",
    "early-data",
    "extended-master-secret",
    "certificate",
    "mozilla-intermediate",
];

/// The whole scan takes about 15 s; past this the script is stopped (SIGTERM, so its trap stops
/// the gateway) and the test fails.
const SCAN_TIMEOUT: Duration = Duration::from_secs(120);

fn runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn sslyze_scan_of_the_gateway_passes_every_check() {
    const TEST: &str = "sslyze_scan_of_the_gateway_passes_every_check";
    if !runs("sslyze", "--help") {
        return skip::skip(TEST, "sslyze is not on PATH (pip install sslyze)");
    }
    if !runs("openssl", "version") {
        return skip::skip(TEST, "openssl is not on PATH (apt-get install openssl)");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tls-scan");
    let stdout_path = out.with_extension("stdout");
    let stderr_path = out.with_extension("stderr");
    let mut child = Command::new("bash")
        .arg(root.join("scripts/tls-scan.sh"))
        .env("BIN", env!("CARGO_BIN_EXE_bars-gateway"))
        .env("OUT", &out)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("cannot run bash scripts/tls-scan.sh");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > SCAN_TIMEOUT {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!(
                "scripts/tls-scan.sh did not finish within {SCAN_TIMEOUT:?}; output so far:\n{}\n{}",
                std::fs::read_to_string(&stdout_path).unwrap_or_default(),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    eprintln!("{stderr}{stdout}(scan took {:?})", started.elapsed());
    assert!(
        status.success(),
        "scripts/tls-scan.sh failed ({status}); results in {}:\n{stdout}\n{stderr}",
        out.display()
    );
    assert!(
        stdout.contains("VERDICT PASS") && !stdout.lines().any(|l| l.starts_with("FAIL")),
        "{stdout}"
    );

    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for id in REQUIREMENTS {
        let row = summary
            .lines()
            .find(|l| l.starts_with(&format!("| {id} |")))
            .unwrap_or_else(|| panic!("summary.md has no row for {id}:\n{summary}"));
        assert!(row.contains("| **PASS** |"), "{id} did not pass: {row}");
    }
    assert!(summary.contains("**Verdict: PASS**"), "{summary}");
    for json in ["sslyze-client-cert.json", "sslyze-no-client-cert.json"] {
        assert!(
            out.join(json).is_file(),
            "{json} missing in {}",
            out.display()
        );
    }
}
