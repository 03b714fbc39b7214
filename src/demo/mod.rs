//! `bars-gateway demo`: the gateway working end to end on this machine with nothing else
//! installed. It makes a throwaway PKI in a temp dir, starts a sample legacy receiver and the
//! gateway on loopback, sends a handful of real BaRS requests through over TLS-MA (a valid one,
//! its retry, a malformed header, an unknown client certificate), prints what happened, then
//! keeps running with copy-paste `curl` commands until Ctrl-C. With `--once` it exits after the
//! scenario: 0 when every outcome was as expected, 1 otherwise (DESIGN.md §2).

pub mod pki;
pub mod receiver;
pub mod scenario;
pub mod sender;

use std::net::SocketAddr;
use std::path::Path;

use tokio::sync::oneshot;

use crate::config::{self, Settings, PROD_PROXY_SUBJECT};
use crate::{Gateway, StartError};
use pki::DemoPki;
use receiver::SampleReceiver;
use scenario::{headers_with, StepResult, Target};

/// The port the interactive demo tries first, so the printed commands look familiar; if it is
/// busy the OS picks one. `--once` always lets the OS pick.
pub const PREFERRED_PORT: u16 = 8443;

/// Why the demo could not run (as opposed to an outcome that was not as expected).
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct DemoError {
    context: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl DemoError {
    /// An error with what the demo was doing.
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DemoError {
        DemoError {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An error that is only a message.
    pub fn msg(message: &str) -> DemoError {
        DemoError::new("demo", message)
    }
}

/// How the demo ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: every step got the expected outcome.
    AllAsExpected,
    /// `--once`: at least one step did not.
    SomeUnexpected,
    /// Interactive: stopped by Ctrl-C or SIGTERM after draining.
    Stopped,
}

impl Outcome {
    /// Whether the process should exit 0.
    pub fn success(self) -> bool {
        self != Outcome::SomeUnexpected
    }
}

/// Runs the demo; with `once`, returns after the scenario, else after Ctrl-C or SIGTERM. Needs a
/// Tokio runtime with I/O, time and signals enabled.
pub async fn run(once: bool) -> Result<Outcome, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("bars-gateway-demo-")
        .tempdir()
        .map_err(|e| DemoError::new("cannot create a temp dir", e))?;
    let pki = pki::write_demo_pki(dir.path(), PROD_PROXY_SUBJECT)
        .map_err(|e| DemoError::new("cannot make the demo PKI", e))?;
    let body_file = dir.path().join("process-message-request.json");
    std::fs::write(&body_file, scenario::PROCESS_MESSAGE_BODY)
        .map_err(|e| DemoError::new(format!("cannot write {}", body_file.display()), e))?;

    let receiver = SampleReceiver::start()
        .await
        .map_err(|e| DemoError::new("cannot start the sample legacy receiver", e))?;
    let preferred = if once { 0 } else { PREFERRED_PORT };
    let relay_tls = scenario::client_config(&pki, &pki.client_cert, &pki.client_key)?;
    let stand_in = sender::StandIn::bind(&pki, relay_tls).await?;
    let (gateway, settings) =
        bind_gateway(&pki, &receiver.url(), preferred, &stand_in.egress_toml()).await?;
    let addr = gateway.local_addr();
    let admin = gateway.admin_addr();
    let egress = gateway
        .egress_addr()
        .ok_or_else(|| DemoError::msg("the egress listener did not start"))?;
    let stand_in = stand_in.serve(addr);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async move {
        let _ = stop_rx.await;
    }));

    println!("bars-gateway demo: a throwaway PKI, a sample legacy receiver and the gateway, on loopback.\n");
    println!("  PKI and config     {}", pki.dir.display());
    println!(
        "  legacy receiver    {} (plain HTTP: your existing system)",
        receiver.url()
    );
    println!(
        "  gateway (TLS-MA)   https://localhost:{} -> {}",
        addr.port(),
        receiver.url()
    );
    if let Some(admin) = admin {
        println!("  gateway admin      http://{admin}");
    }
    println!("  trusted client     CN={PROD_PROXY_SUBJECT} (as the BaRS PROD proxy), from the demo sub-CA");
    println!("\nSending BaRS requests through the gateway, as the BaRS proxy would:");

    let target = Target::new(addr, &pki)?;
    let results = scenario::run_scenario(&target, &receiver).await?;
    println!("\n{}", scenario::render_table(&results));
    println!(
        "\nSending as the legacy system: plain HTTP to the egress listener (http://{egress}), which"
    );
    println!("fetches a token and sends to a stand-in BaRS API that relays over TLS-MA to the receiver side:");
    let sent = sender::run_round_trip(egress, &stand_in, scenario::PROCESS_MESSAGE_BODY).await?;
    println!("\n{}", sender::render(&sent));
    let all_as_expected =
        results.iter().all(StepResult::as_expected) && sent.iter().all(|row| row.ok);

    let outcome = if once {
        if all_as_expected {
            Outcome::AllAsExpected
        } else {
            Outcome::SomeUnexpected
        }
    } else {
        print_try_it_yourself(&pki, &settings, addr, admin, &body_file)?;
        println!("\n  # Send as the legacy system, through the egress listener (plain HTTP):");
        println!("{}", sender::curl_line(egress, &body_file));
        wait_for_stop_signal().await;
        println!(
            "\nStopping: draining the gateway, then deleting {}",
            pki.dir.display()
        );
        Outcome::Stopped
    };
    let _ = stop_tx.send(());
    serving
        .await
        .map_err(|e| DemoError::new("the gateway task failed", e))?;
    drop(stand_in);
    drop(receiver);
    dir.close()
        .map_err(|e| DemoError::new(format!("cannot delete {}", pki.dir.display()), e))?;
    Ok(outcome)
}

/// The gateway's config: everything on loopback, the demo PKI, the sample receiver upstream.
fn config_toml(port: u16, upstream_url: &str, egress: &str) -> String {
    format!(
        r#"# Written by `bars-gateway demo`: a throwaway gateway on loopback.
# Relative paths resolve against this file's directory.

[listen]
address = "127.0.0.1:{port}"
shutdown_grace = "5s"

[tls]
certificate = "server-chain.pem"
private_key = "server.key"
client_ca = ["root.pem", "sub-ca.pem"]

[client]
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["{PROD_PROXY_SUBJECT}"]

[upstream]
url = "{upstream_url}"

[admin]
address = "127.0.0.1:0"

[log]
# warn keeps the demo's output readable; "info" shows the audit record of every request.
level = "warn"
format = "text"
{egress}"#
    )
}

fn write_config(
    path: &Path,
    port: u16,
    upstream_url: &str,
    egress: &str,
) -> Result<Settings, DemoError> {
    std::fs::write(path, config_toml(port, upstream_url, egress))
        .map_err(|e| DemoError::new(format!("cannot write {}", path.display()), e))?;
    config::load(path).map_err(|e| DemoError::new("the demo config is invalid", e))
}

/// Writes the config and binds the gateway on `preferred` (0 = any), falling back to any port
/// if `preferred` is busy.
async fn bind_gateway(
    pki: &DemoPki,
    upstream_url: &str,
    preferred: u16,
    egress: &str,
) -> Result<(Gateway, Settings), DemoError> {
    let path = pki.dir.join("config.toml");
    let settings = write_config(&path, preferred, upstream_url, egress)?;
    crate::init_logging(&settings.log);
    match Gateway::bind(settings.clone()).await {
        Ok(gateway) => Ok((gateway, settings)),
        Err(StartError::Bind {
            key: "listen.address",
            ..
        }) if preferred != 0 => {
            let settings = write_config(&path, 0, upstream_url, egress)?;
            let gateway = Gateway::bind(settings.clone())
                .await
                .map_err(|e| DemoError::new("cannot start the gateway", e))?;
            Ok((gateway, settings))
        }
        Err(e) => Err(DemoError::new("cannot start the gateway", e)),
    }
}

fn print_try_it_yourself(
    pki: &DemoPki,
    settings: &Settings,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    body_file: &Path,
) -> Result<(), DemoError> {
    let base = format!("https://localhost:{}", addr.port());
    let tls = format!(
        "--cacert {} --cert {} --key {}",
        shell_path(&pki.root),
        shell_path(&pki.client_cert),
        shell_path(&pki.client_key)
    );
    // A fresh X-Request-Id the scenario has not used: the first POST is new, the second a retry.
    let post_headers = headers_with(&uuid::Uuid::new_v4().to_string(), &[])?;
    let metadata_headers: Vec<(String, String)> =
        headers_with(&uuid::Uuid::new_v4().to_string(), &[])?
            .into_iter()
            .filter(|(name, _)| {
                [
                    "Accept",
                    "X-Request-Id",
                    "X-Correlation-Id",
                    "NHSD-Target-Identifier",
                ]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
            })
            .collect();

    println!("The gateway keeps running. Try it yourself (copy-paste):\n");
    println!("  # GET /metadata: the receiver's CapabilityStatement");
    println!(
        "{}",
        curl(&tls, &metadata_headers, None, &format!("{base}/metadata"))
    );
    println!(
        "\n  # POST /$process-message: run it twice, the second is a retry (409 REC_CONFLICT)"
    );
    println!(
        "{}",
        curl(
            &tls,
            &post_headers,
            Some(body_file),
            &format!("{base}/$process-message")
        )
    );
    println!("\n  # The client certificate from the untrusted CA: refused in the TLS handshake");
    println!(
        "  curl -sS -i --cacert {} --cert {} --key {} '{base}/metadata'",
        shell_path(&pki.root),
        shell_path(&pki.untrusted_client_cert),
        shell_path(&pki.untrusted_client_key)
    );

    println!("\nFiles (deleted on exit), in {}:", pki.dir.display());
    let files: [(&Path, &str); 10] = [
        (pki.root.as_path(), "root CA (what clients trust: --cacert)"),
        (
            &pki.sub_ca,
            "sub-CA, issued the server and client certificates",
        ),
        (
            &pki.server_chain,
            "server certificate for localhost and 127.0.0.1, then the sub-CA",
        ),
        (pki.server_key.as_path(), "server key"),
        (
            &pki.client_cert,
            "trusted client certificate (CN only, like the BaRS proxy's)",
        ),
        (pki.client_key.as_path(), "trusted client key"),
        (
            pki.untrusted_ca.as_path(),
            "a CA the gateway does not trust",
        ),
        (
            &pki.untrusted_client_cert,
            "client certificate from it, same CN",
        ),
        (pki.untrusted_client_key.as_path(), "its key"),
        (body_file, "the example $process-message body"),
    ];
    for (path, what) in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        println!("  {name:<30} {what}");
    }
    println!(
        "  {:<30} the gateway's config (try: bars-gateway check --config {})",
        "config.toml",
        shell_path(&settings.source)
    );
    if let Some(admin) = admin {
        println!("\nAdmin (plain HTTP, loopback):");
        println!("  curl http://{admin}/metrics");
        println!("  curl http://{admin}/readyz");
        println!("  curl http://{admin}/healthz");
    }
    println!("\nThe legacy receiver prints a line for each request it gets. Press Ctrl-C to stop.");
    Ok(())
}

/// A copy-paste `curl` command, one option per line.
fn curl(tls: &str, headers: &[(String, String)], body: Option<&Path>, url: &str) -> String {
    let mut lines = vec![format!("  curl -sS -i {tls}")];
    for (name, value) in headers {
        lines.push(format!("    -H '{name}: {value}'"));
    }
    if let Some(body) = body {
        lines.push(format!("    --data-binary @{}", shell_path(body)));
    }
    // Single quotes: the URL's `$` must reach curl as is.
    lines.push(format!("    '{url}'"));
    lines.join(" \\\n")
}

/// A path for a shell command line: quoted when it holds anything a shell would interpret.
fn shell_path(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
