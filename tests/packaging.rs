//! The packaging under `packaging/` stays true to the gateway: the systemd unit verifies, the
//! dashboard and alerts ask only for metrics the gateway exposes, the container runs as non-root
//! with a health story, the Kubernetes config loads, and the Debian package's files exist.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

const UNIT: &str = "packaging/systemd/bars-gateway.service";

/// `systemd-analyze`, or `None` with a loud message (the check is then skipped).
fn systemd_analyze(check: &str) -> Option<PathBuf> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        Some(PathBuf::from("systemd-analyze"))
    } else {
        skip(
            check,
            "systemd-analyze is not installed (apt-get install systemd)",
        );
        None
    }
}

/// A copy of the unit in a temp dir whose ExecStart names the freshly built binary, because
/// `systemd-analyze verify` checks that the binary exists and is executable.
fn unit_with_built_binary() -> (tempfile::TempDir, PathBuf) {
    let text = read_repo_file(UNIT);
    let exec_start = "ExecStart=/usr/bin/bars-gateway ";
    assert!(
        text.contains(exec_start),
        "the unit must run /usr/bin/bars-gateway"
    );
    let text = text.replace(
        exec_start,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_bars-gateway")),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bars-gateway.service");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze("systemd_unit_passes_systemd_analyze_verify") else {
        return;
    };
    let (_dir, unit) = unit_with_built_binary();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are warnings (exit 0) that name the file: refuse them too.
    let about_the_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("bars-gateway.service"))
        .collect();
    assert!(
        about_the_unit.is_empty(),
        "systemd-analyze verify warnings: {about_the_unit:#?}"
    );
}

#[test]
fn systemd_unit_exposure_stays_ok() {
    let Some(analyze) = systemd_analyze("systemd_unit_exposure_stays_ok") else {
        return;
    };
    let (_dir, unit) = unit_with_built_binary();
    // --threshold is the exposure times ten: 20 means "2.0 or better" (docs/operations.md
    // records the current score, 1.4 with systemd 252).
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no verdict)");
    assert!(out.status.success(), "exposure above 2.0: {verdict}");
}

#[test]
fn systemd_unit_waits_longer_than_the_shutdown_grace() {
    let unit = read_repo_file(UNIT);
    let setting = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
            .trim()
            .to_string()
    };
    assert_eq!(setting("Type"), "notify");
    assert_eq!(setting("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(setting("DynamicUser"), "yes");
    assert_eq!(
        setting("LoadCredential"),
        format!(
            "{}:/etc/bars-gateway/tls/key-password",
            bars_gateway::tls::material::KEY_PASSWORD_CREDENTIAL
        )
    );
    // The default when the file is missing, so an unencrypted key needs no credential file.
    assert_eq!(
        setting("SetCredential"),
        format!(
            r"{}:\n",
            bars_gateway::tls::material::KEY_PASSWORD_CREDENTIAL
        )
    );
    let stop = humantime::parse_duration(&setting("TimeoutStopSec")).unwrap();
    let example = bars_gateway::config::load(&repo_file("config.example.toml")).unwrap();
    assert!(
        stop > example.listen.shutdown_grace,
        "TimeoutStopSec {stop:?} must outlast shutdown_grace {:?}",
        example.listen.shutdown_grace
    );
}

// ---------------------------------------------------------------------------------------------
// Metric names used by the dashboard and the alerts

/// Every series name the exposition offers: the samples present, plus the series each declared
/// family produces once it has samples (a labelled family with no samples yet still has its
/// `# TYPE` line).
fn exposed_series(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for suffix in suffixes {
                names.insert(format!("{family}{suffix}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `bars_gateway_*` name mentioned in a file.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("bars_gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

async fn get_metrics(admin: std::net::SocketAddr) -> String {
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/metrics")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("/metrics answers in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_the_gateway_exposes() {
    let rig = Rig::start().await;
    // Give the labelled families samples: a forwarded POST (status, dedup, upstream timing), a
    // refused request, a refused handshake and a reload.
    assert_eq!(rig.send(process_message()).await.status, 200);
    let refused = http::Request::get("/metadata")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(rig.send(refused).await.status, 400);
    let no_cert = send(rig.gateway.addr, rig.pki.client_config(None), metadata()).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate is refused"
    );
    rig.gateway.reloader.reload().await.unwrap();

    let exposition = get_metrics(rig.gateway.admin.expect("admin listener")).await;
    let exposed = exposed_series(&exposition);
    for family in [
        "bars_gateway_requests_total",
        "bars_gateway_rejections_total",
        "bars_gateway_dedup_total",
        "bars_gateway_upstream_duration_seconds_bucket",
        "bars_gateway_tls_handshake_failures_total",
        "bars_gateway_certificate_expiry_timestamp_seconds",
        "bars_gateway_reloads_total",
        "bars_gateway_connections_open",
    ] {
        assert!(
            exposed.contains(family),
            "DESIGN.md §6 metric {family} missing from /metrics:\n{exposition}"
        );
    }

    for file in [
        "packaging/grafana/bars-gateway.json",
        "packaging/prometheus/alerts.yaml",
    ] {
        let used = referenced_metrics(&read_repo_file(file));
        assert!(!used.is_empty(), "{file} uses no bars_gateway_ metric");
        let unknown: Vec<&String> = used.difference(&exposed).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the gateway does not expose: {unknown:?}\nexposed: {exposed:?}"
        );
    }
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let text = read_repo_file("packaging/grafana/bars-gateway.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()));
            queries += 1;
        }
    }
    assert!(queries >= 8, "one query per DESIGN.md §6 metric at least");
}

/// `promtool check rules`, when promtool is installed (Debian package `prometheus`).
#[test]
fn alert_rules_pass_promtool_when_installed() {
    let present = Command::new("promtool")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        return skip(
            "alert_rules_pass_promtool_when_installed",
            "promtool is not installed (apt-get install prometheus)",
        );
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("packaging/prometheus/alerts.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Container

/// The instructions of a Dockerfile (continuation lines joined, comments dropped).
fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

#[test]
fn container_image_runs_as_non_root_with_a_health_story() {
    let text = read_repo_file("packaging/docker/Dockerfile");
    let all = dockerfile_instructions(&text);
    let last_from = all
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM");
    assert!(
        all[..last_from]
            .iter()
            .any(|i| i.contains("cargo build --release --locked")),
        "a builder stage running cargo build --release --locked"
    );
    // Both base images are build arguments with defaults (mirrors, pinned digests, offline).
    for (arg, default) in [
        ("BUILD_IMAGE", "rust:${RUST_VERSION}-bookworm"),
        ("RUNTIME_IMAGE", "gcr.io/distroless/cc-debian12:nonroot"),
    ] {
        let first_from = all.iter().position(|i| i.starts_with("FROM ")).unwrap();
        assert!(
            all[..first_from].contains(&format!("ARG {arg}={default}")),
            "ARG {arg}={default} before the first FROM"
        );
        assert!(
            all.iter()
                .any(|i| i.starts_with(&format!("FROM ${{{arg}}}"))),
            "a FROM ${{{arg}}}"
        );
    }
    let runtime = &all[last_from..];
    let user = runtime.iter().rev().find_map(|i| i.strip_prefix("USER "));
    let non_root = match user {
        Some(user) => {
            let name = user.split(':').next().unwrap_or_default().trim();
            !(name.is_empty() || name == "0" || name == "root")
        }
        None => all.iter().any(|i| i.contains("cc-debian12:nonroot")),
    };
    assert!(non_root, "the runtime stage runs as a non-root user");
    for expected in [
        "EXPOSE 8443 9090",
        r#"ENTRYPOINT ["bars-gateway"]"#,
        r#"CMD ["run", "--config", "/etc/bars-gateway/config.toml"]"#,
    ] {
        assert!(runtime.iter().any(|i| i == expected), "{expected}");
    }
    let healthcheck = runtime
        .iter()
        .find_map(|i| i.strip_prefix("HEALTHCHECK "))
        .expect("a HEALTHCHECK instruction (CMD, or NONE with the alternative documented)");
    if healthcheck.trim() == "NONE" {
        let ops = read_repo_file("docs/operations.md");
        assert!(
            ops.contains("HEALTHCHECK NONE") && ops.contains("/readyz"),
            "docs/operations.md explains probing /readyz instead"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The text of a `key: |` block scalar in a YAML file.
fn yaml_block(text: &str, key: &str) -> String {
    let mut lines = text.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim() == format!("{key}: |"))
        .unwrap_or_else(|| panic!("no `{key}: |` block"));
    let key_indent = header.len() - header.trim_start().len();
    let mut block = String::new();
    let mut indent = None;
    for line in lines {
        let this = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && this <= key_indent {
            break;
        }
        let indent = *indent.get_or_insert(this);
        block.push_str(line.get(indent..).unwrap_or(""));
        block.push('\n');
    }
    block
}

#[test]
fn kubernetes_sidecar_config_loads_and_outlasts_the_drain() {
    let manifest = read_repo_file("packaging/kubernetes/sidecar.yaml");
    let config = yaml_block(&manifest, "config.toml");
    let settings = bars_gateway::config::parse(&config, Path::new("/etc/bars-gateway/config.toml"))
        .unwrap_or_else(|e| panic!("the ConfigMap's config.toml: {e}"));
    assert_eq!(
        settings.admin.address.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:9090"),
        "kubelet probes need the admin listener on the pod address"
    );
    assert_eq!(settings.listen.address.port(), 8443);
    let upstream = settings.upstream.url.expect("an upstream");
    assert_eq!(upstream.authority, "127.0.0.1:8080");

    let grace: u64 = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("terminationGracePeriodSeconds")
        .trim()
        .parse()
        .unwrap();
    assert!(
        Duration::from_secs(grace) > settings.listen.shutdown_grace,
        "terminationGracePeriodSeconds {grace} must outlast shutdown_grace {:?}",
        settings.listen.shutdown_grace
    );
    for probe in ["path: /healthz", "path: /readyz"] {
        assert!(manifest.contains(probe), "{probe}");
    }
}

// ---------------------------------------------------------------------------------------------
// Debian package

#[test]
fn deb_assets_exist() {
    let manifest: toml::Table = toml::from_str(&read_repo_file("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let bins: Vec<&str> = manifest["bin"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    let assets = deb["assets"]
        .as_array()
        .expect("package.metadata.deb.assets");
    let mut destinations = Vec::new();
    for asset in assets {
        let asset = asset.as_array().expect("[source, destination, mode]");
        let source = asset[0].as_str().unwrap();
        let destination = asset[1].as_str().unwrap();
        // cargo-deb builds target/release/* itself: it must be one of the crate's binaries.
        if let Some(binary) = source.strip_prefix("target/release/") {
            assert!(bins.contains(&binary), "{source} is not a [[bin]]");
        } else {
            assert!(repo_file(source).is_file(), "deb asset {source} is missing");
        }
        let file_name = source.rsplit('/').next().unwrap();
        destinations.push(match destination.strip_suffix('/') {
            Some(dir) => format!("/{dir}/{file_name}"),
            None => format!("/{destination}"),
        });
    }
    for required in [
        "/usr/bin/bars-gateway",
        "/lib/systemd/system/bars-gateway.service",
        "/etc/bars-gateway/config.toml",
    ] {
        assert!(
            destinations.iter().any(|d| d == required),
            "{required} not installed"
        );
    }
    for conf in deb["conf-files"].as_array().expect("conf-files") {
        let conf = conf.as_str().unwrap();
        assert!(
            destinations.iter().any(|d| d == conf),
            "conf-file {conf} is not installed by an asset"
        );
    }
}
