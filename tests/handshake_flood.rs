//! A flood of refused handshakes does not grow memory without bound. The test measures this
//! process's RSS (the gateway runs in-process), so it lives alone in this test binary.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::raw_http::SAFETY_NET;
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

// ---- a flood of refused handshakes -------------------------------------------------------------

/// This process's resident set size (the gateway runs in-process), in KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// One client refused in the handshake: in TLS 1.3 the client may finish first, so the refusal
/// (an alert, or the close) is read after it.
async fn refused_handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    if let Ok(mut tls) = connected {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(SAFETY_NET, tls.read(&mut buf))
            .await
            .expect("the refusal arrives");
        assert!(matches!(read, Ok(0) | Err(_)), "a refused client got data");
    }
}

/// `n` refused handshakes, 25 at a time, alternating no certificate and an untrusted one.
async fn flood(rig: &Rig, n: usize) {
    let configs = [
        rig.pki.client_config(None),
        rig.pki.client_config(Some(ClientCert::Rogue)),
    ];
    for wave in 0..n.div_ceil(25) {
        let mut set = tokio::task::JoinSet::new();
        for i in wave * 25..((wave + 1) * 25).min(n) {
            set.spawn(refused_handshake(rig.gateway.addr, configs[i % 2].clone()));
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    }
}

/// Waits until the gateway has counted `failures` refused handshakes and closed every connection
/// (the client may see the alert before the gateway counts it; metrics are polled).
async fn settle(rig: &Rig, failures: f64) {
    let deadline = tokio::time::Instant::now() + SAFETY_NET;
    while handshake_failures(rig).await < failures {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_metric_of(
        rig.gateway.admin.unwrap(),
        "bars_gateway_connections_open",
        |open| open == 0.0,
    )
    .await;
}

/// Every refused handshake counted, whatever the reason.
async fn handshake_failures(rig: &Rig) -> f64 {
    let text = admin_get(rig.gateway.admin.unwrap(), "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("bars_gateway_tls_handshake_failures_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_refused_handshakes_do_not_grow_memory_without_bound() {
    let rig = Rig::start().await;
    // Warm up allocator pools and lazily built state, then measure a flood five times as big.
    flood(&rig, 100).await;
    settle(&rig, 100.0).await;
    let before = vm_rss_kib();
    flood(&rig, 500).await;
    settle(&rig, 600.0).await;
    let after = vm_rss_kib();
    println!("VmRSS {before} KiB -> {after} KiB after 500 refused handshakes");
    assert!(
        after.saturating_sub(before) < 50 * 1024,
        "RSS grew by {} KiB",
        after - before
    );
    assert_eq!(
        handshake_failures(&rig).await,
        600.0,
        "every one refused in the handshake"
    );
    assert_eq!(rig.send(metadata()).await.status, 200, "still serving");
    assert_eq!(rig.upstream.count(), 1);
}
