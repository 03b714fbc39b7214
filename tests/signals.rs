//! The real binary under signals: SIGHUP reloads it, SIGTERM drains the request in flight and
//! exits 0 (these ran in every test binary while they lived in tests/common/mod.rs).

mod common;

use std::sync::Arc;

use common::*;
use http::StatusCode;
use tokio::net::TcpStream;

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let (mut child, port, lines) = spawn_gateway(&pki, &upstream.url());
    wait_for_line(&lines, "bars-gateway listening");
    signal(&child, "-HUP");
    wait_for_line(&lines, "SIGHUP");
    wait_for_line(&lines, "reloaded");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let reply = send(addr, pki.client_config(Some(ClientCert::Proxy)), metadata())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    signal(&child, "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    upstream.set_reply(Reply::Gated(gate.clone(), StatusCode::OK));
    let (mut child, port, lines) = spawn_gateway(&pki, &upstream.url());
    wait_for_line(&lines, "bars-gateway listening");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = pki.client_config(Some(ClientCert::Proxy));
    let in_flight = tokio::spawn(async move { send(addr, config, process_message()).await });
    upstream.wait_for_count(1).await;
    signal(&child, "-TERM");
    wait_for_line(&lines, "draining");
    // No new connections are accepted while draining...
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener is closed while draining");
    // ...and the request in flight completes.
    gate.add_permits(1);
    let reply = in_flight.await.unwrap().unwrap();
    assert_eq!(reply.status, 200);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
