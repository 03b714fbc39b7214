//! Failures an operator can see: every metric family and every known label value from the first
//! scrape, the reload gauge that stays down while stale material serves, `/readyz` saying which
//! check failed, readiness changes logged once, the startup line, journal priorities and no
//! colour codes off a terminal.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use bars_gateway::metrics::{
    KNOWN_DEDUP_OUTCOMES, KNOWN_HANDSHAKE_FAILURE_REASONS, KNOWN_RELOAD_RESULTS,
};
use common::*;

/// The value of the sample line starting with `series` (labels included), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test]
async fn every_known_label_value_is_exposed_at_0_before_any_traffic() {
    let rig = Rig::start().await;
    let (status, _, metrics) = admin_request(rig.gateway.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    for reason in bars_gateway::rejection::RejectionReason::ALL {
        let series = format!("bars_gateway_rejections_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}:\n{metrics}");
    }
    for outcome in KNOWN_DEDUP_OUTCOMES {
        let series = format!("bars_gateway_dedup_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    for kind in bars_gateway::metrics::UPSTREAM_FAILURE_KINDS {
        let series = format!("bars_gateway_upstream_failures_total{{kind=\"{kind}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    for reason in KNOWN_HANDSHAKE_FAILURE_REASONS {
        let series = format!("bars_gateway_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    for result in KNOWN_RELOAD_RESULTS {
        let series = format!("bars_gateway_reloads_total{{result=\"{result}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    assert!(KNOWN_DEDUP_OUTCOMES.contains(&"uncertain"));
    assert_eq!(
        sample(&metrics, "bars_gateway_last_reload_success"),
        Some(1.0),
        "the start is a successful load"
    );
    assert!(sample(&metrics, "bars_gateway_last_reload_timestamp_seconds").unwrap() > 1.7e9);
    let crl_next = sample(
        &metrics,
        "bars_gateway_crl_next_update_timestamp_seconds{issuer=\"O=nhs, OU=CA, CN=Test NHS Level 1C\"}",
    )
    .expect("the CRL's next update");
    assert!(crl_next > 1.7e9, "{crl_next}");
    assert_eq!(
        sample(&metrics, "bars_gateway_connections_accepted_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "bars_gateway_tls_handshakes_total"),
        Some(0.0)
    );
    assert!(
        metrics.contains("# TYPE bars_gateway_dedup_entries gauge"),
        "{metrics}"
    );
}

#[tokio::test]
async fn connections_handshakes_and_dedup_entries_are_counted() {
    let rig = Rig::start().await;
    assert_eq!(rig.send(process_message()).await.status, 200);
    assert_eq!(rig.send(metadata()).await.status, 200);
    assert!(send(
        rig.gateway.addr,
        rig.pki.client_config(Some(ClientCert::Rogue)),
        metadata()
    )
    .await
    .is_err());
    let admin = rig.gateway.admin.unwrap();
    let (_, _, metrics) = admin_request(admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "bars_gateway_connections_accepted_total"),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, "bars_gateway_tls_handshakes_total"),
        Some(2.0)
    );
    // The entries gauge is set by the background probe: wait for it to see the POST's id.
    wait_for_metric_of(admin, "bars_gateway_dedup_entries", |v| v == 1.0).await;
}

#[tokio::test]
async fn a_failed_reload_keeps_the_success_gauge_at_0_until_a_reload_succeeds() {
    let rig = Rig::start().await;
    let admin = rig.gateway.admin.unwrap();
    let good = std::fs::read(rig.pki.path("server.key")).unwrap();
    std::fs::write(rig.pki.path("server.key"), b"not a key").unwrap();
    assert!(rig.gateway.reloader.reload().await.is_err());
    let (_, _, metrics) = admin_request(admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "bars_gateway_last_reload_success"),
        Some(0.0)
    );
    // Unlike a rate of reloads_total{result="failure"}, it stays 0 as time passes without reloads.
    let (_, _, metrics) = admin_request(admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "bars_gateway_last_reload_success"),
        Some(0.0)
    );
    std::fs::write(rig.pki.path("server.key"), good).unwrap();
    rig.gateway.reloader.reload().await.unwrap();
    let (_, _, metrics) = admin_request(admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "bars_gateway_last_reload_success"),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "bars_gateway_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn readyz_says_which_check_failed() {
    let rig = Rig::start().await;
    let admin = rig.gateway.admin.unwrap();
    let (status, ready) = readyz_until(admin, |s, _| s == 200).await;
    assert_eq!(status, 200);
    assert_eq!(
        ready,
        serde_json::json!({"ready": true, "tls": "ok", "upstream": "ok", "dedup_store": "ok"})
    );
    rig.upstream.stop();
    let (status, body) = readyz_until(admin, |s, _| s == 503).await;
    assert_eq!(status, 503);
    assert_eq!(body["ready"], false);
    assert_eq!(body["tls"], "ok");
    assert_eq!(body["dedup_store"], "ok");
    let upstream = body["upstream"].as_str().unwrap();
    assert!(
        upstream.contains("not accepting connections") && upstream.contains("127.0.0.1:"),
        "{body}"
    );
}

#[test]
fn readiness_changes_are_logged_once_at_warn_and_the_startup_line_states_the_facts() {
    let pki = TestPki::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestUpstream::start());
    let upstream_url = upstream.url();
    let (mut child, port, lines) = spawn_gateway_with(&pki, &upstream_url, |toml| {
        toml.replace("format = \"text\"", "format = \"json\"")
    });
    let startup = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a startup line");
        if line.contains("bars-gateway listening") {
            break serde_json::from_str::<serde_json::Value>(&line).expect("JSON log line");
        }
    };
    assert_eq!(startup["level"], "INFO");
    assert_eq!(startup["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(startup["environment"], "custom");
    assert_eq!(startup["address"], format!("127.0.0.1:{port}"));
    assert!(
        startup["admin"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{startup}"
    );
    assert!(
        startup["upstreams"]
            .as_str()
            .unwrap()
            .contains(&upstream_url),
        "{startup}"
    );
    assert_eq!(startup["dedup"], "memory");
    // The test certificates are valid for years; the CAs are the nearest-expiring or the leaf.
    assert!(
        startup["nearest_certificate_expiry_days"].as_i64().unwrap() > 30,
        "{startup}"
    );
    assert!(startup["nearest_certificate"].is_string(), "{startup}");

    upstream.stop();
    let warn = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a readiness warning within 20 s");
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if record["check"] == "upstream" {
            break record;
        }
    };
    assert_eq!(warn["level"], "WARN", "{warn}");
    assert!(
        warn["problem"]
            .as_str()
            .unwrap()
            .contains("not accepting connections"),
        "{warn}"
    );
    // Once: SIGTERM, then everything logged until exit holds no second upstream warning.
    signal(&child, "-TERM");
    let rest: Vec<String> = lines.iter().collect();
    let again = rest
        .iter()
        .filter(|l| l.contains("\"check\":\"upstream\"") && l.contains("WARN"))
        .count();
    assert_eq!(again, 0, "logged again: {rest:#?}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Runs `bars-gateway run` on a config whose listen port is taken, so that it logs one ERROR
/// ("cannot start") and exits 1, with stderr going to a file; returns the file's text.
fn failing_start_log(pki: &TestPki, format: &str, journal: bool) -> String {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let toml = pki
        .config_toml("http://127.0.0.1:9")
        .replace(
            "address = \"127.0.0.1:0\"\nheader_read_timeout",
            &format!("address = \"127.0.0.1:{port}\"\nheader_read_timeout"),
        )
        .replace("format = \"text\"", &format!("format = \"{format}\""));
    let config = pki.path(&format!("config-{format}-{journal}.toml"));
    std::fs::write(&config, toml).unwrap();
    let log_path = pki.path(&format!("stderr-{format}-{journal}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bars-gateway"));
    command
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    if journal {
        // What systemd sets when the service's stderr is the journal: its device and inode.
        command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        command.env_remove("JOURNAL_STREAM");
    }
    let status = command.status().unwrap();
    assert_eq!(status.code(), Some(1));
    drop(taken);
    std::fs::read_to_string(log_path).unwrap()
}

#[test]
fn under_the_journal_error_lines_carry_priority_3() {
    let pki = TestPki::new();
    let log = failing_start_log(&pki, "json", true);
    let line = log
        .lines()
        .find(|l| l.contains("cannot start"))
        .unwrap_or_else(|| panic!("no ERROR line in {log:?}"));
    assert!(line.starts_with("<3>{"), "{line}");
    let plain = failing_start_log(&pki, "json", false);
    let line = plain.lines().find(|l| l.contains("cannot start")).unwrap();
    assert!(line.starts_with('{'), "no prefix off the journal: {line}");
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let pki = TestPki::new();
    let log = failing_start_log(&pki, "text", false);
    assert!(log.contains("cannot start"), "{log}");
    assert!(log.contains("ERROR"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape in {log:?}");
    let journal = failing_start_log(&pki, "text", true);
    assert!(!journal.contains('\u{1b}'), "ANSI escape in {journal:?}");
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<3>") && l.contains("cannot start")),
        "{journal}"
    );
}
