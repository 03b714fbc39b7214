//! `bars-gateway demo --once`: the built binary, on a fresh temp dir, with nothing else running.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `bars-gateway demo --once`, killing it after `limit`. Returns (exit code, stdout, stderr).
fn run_demo_once(limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
        .args(["demo", "--once"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "demo --once still running after {limit:?}; stdout so far:\n{}",
                out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), out.join().unwrap(), err.join().unwrap())
}

/// The table row of `step`, e.g. `(a)`.
fn row<'a>(stdout: &'a str, step: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.trim_start().starts_with(step))
        .unwrap_or_else(|| panic!("no row {step} in the table:\n{stdout}"))
}

#[test]
fn demo_once_runs_the_scenario_and_every_outcome_is_as_expected() {
    let (code, stdout, stderr) = run_demo_once(Duration::from_secs(60));
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    let a = row(&stdout, "(a)");
    assert!(a.contains("POST /$process-message"), "{context}");
    assert!(
        a.contains('✔'),
        "(a) valid request should get 200: {context}"
    );

    let b = row(&stdout, "(b)");
    assert!(b.contains("409 REC_CONFLICT"), "{context}");
    assert!(
        b.contains('✔'),
        "(b) the retry should get 409 REC_CONFLICT without reaching the receiver: {context}"
    );

    let c = row(&stdout, "(c)");
    assert!(c.contains("NHSD-Target-Identifier"), "{context}");
    assert!(
        c.contains('✔'),
        "(c) the malformed header should get 400 REC_BAD_REQUEST: {context}"
    );

    let d = row(&stdout, "(d)");
    assert!(d.contains("untrusted CA"), "{context}");
    assert!(
        d.contains('✔'),
        "(d) the untrusted client should be refused in the handshake: {context}"
    );

    assert!(
        stdout.contains("legacy receiver #1: POST /$process-message"),
        "the receiver prints what it gets: {context}"
    );
    assert!(stdout.contains("4 of 4 outcomes as expected"), "{context}");
    // The sending round trip: token, forced transient failure and its retry, the 409 a repeat earns.
    let token = row(&stdout, "token: signed JWT");
    assert!(
        token.contains("got 1 fetch, verified") && token.ends_with("ok"),
        "{context}"
    );
    let sent = row(&stdout, "POST /$process-message via egress");
    assert!(
        sent.contains("got 200 after 2 attempts, same ids") && sent.ends_with("ok"),
        "{context}"
    );
    let repeat = row(&stdout, "the same message again");
    assert!(
        repeat.contains("got 409 REC_CONFLICT, 1 attempt") && repeat.ends_with("ok"),
        "{context}"
    );
    assert_eq!(code, Some(0), "exit 0 when all is as expected: {context}");
    assert!(
        !stdout.contains("curl "),
        "--once prints no curl commands: {context}"
    );
}
