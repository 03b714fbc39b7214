//! Admission over real loopback TCP, before any TLS byte: who reaches the handshake (the IP
//! allowlist, PROXY v1/v2 headers from trusted L4 balancers), that a refused peer gets not one byte
//! back and never reaches the upstream, and that every refusal is counted by reason in `/metrics`.
//!
//! Linux routes all of 127.0.0.0/8 to loopback, so a client socket bound to 127.0.0.2 or 127.0.0.3
//! before connecting is a distinct peer address: 127.0.0.1 is the allowed client, 127.0.0.2 a
//! stranger, 127.0.0.3 the load balancer. PROXY headers are written out by hand from the
//! specification (haproxy.org/download/2.9/doc/proxy-protocol.txt), not by the code under test.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bars_gateway::config::Settings;
use common::*;
use ipnet::IpNet;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The allowed direct client.
const CLIENT: [u8; 4] = [127, 0, 0, 1];
/// A peer outside `client.allowed_ips`.
const STRANGER: [u8; 4] = [127, 0, 0, 2];
/// The L4 load balancer (`listen.trusted_proxies`).
const BALANCER: [u8; 4] = [127, 0, 0, 3];
/// The real client a balancer relays (TEST-NET-3), in `client.allowed_ips`.
const RELAYED: [u8; 4] = [203, 0, 113, 7];
/// A relayed client outside `client.allowed_ips`.
const RELAYED_STRANGER: [u8; 4] = [198, 51, 100, 9];
/// The v2 signature (spec §2.2).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Safety net only: every refusal closes at once, so this never elapses in a passing run.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

/// allowed_ips = 127.0.0.1/32 (the harness default) + the relayed client; the balancer trusted.
fn behind_balancer(settings: &mut Settings) {
    settings.client.allowed_ips = vec![net("127.0.0.1/32"), net("203.0.113.7/32")];
    settings.listen.trusted_proxies = vec![net("127.0.0.3/32")];
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// The bytes of a real TLS ClientHello with the proxy's certificate configured (rustls, no I/O).
fn client_hello(rig: &Rig) -> Vec<u8> {
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let mut tls =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut bytes = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut bytes).unwrap();
    }
    assert_eq!(bytes[0], 0x16, "a TLS handshake record");
    bytes
}

/// `PROXY TCP4 <source> 127.0.0.1 <port> 8443\r\n` (spec §2.1).
fn v1_header(source: [u8; 4], port: u16) -> Vec<u8> {
    let source = Ipv4Addr::from(source);
    format!("PROXY TCP4 {source} 127.0.0.1 {port} 8443\r\n").into_bytes()
}

/// A v2 PROXY header for a TCP over IPv4 connection from `source` (spec §2.2).
fn v2_header(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x11, 0x00, 12]); // version 2 + PROXY, AF_INET + STREAM, 12 bytes
    header.extend(source);
    header.extend([127, 0, 0, 1]);
    header.extend(port.to_be_bytes());
    header.extend(8443u16.to_be_bytes());
    header
}

/// A v2 PROXY header for a TCP over IPv6 connection from `source`.
fn v2_header_ipv6(source: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x21, 0x00, 36]); // version 2 + PROXY, AF_INET6 + STREAM, 36 bytes
    header.extend(source.octets());
    header.extend(Ipv6Addr::LOCALHOST.octets());
    header.extend(port.to_be_bytes());
    header.extend(8443u16.to_be_bytes());
    header
}

/// A v2 LOCAL header: the balancer speaks for itself (health checks), no addresses.
fn v2_local_header() -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x20, 0x00, 0x00, 0x00]);
    header
}

/// Connects from `from`, writes `bytes`, and asserts the gateway closes the connection without
/// sending a single byte back (EOF, or a reset because our bytes were left unread).
async fn assert_refused_without_a_byte(gateway: SocketAddr, from: [u8; 4], bytes: &[u8]) {
    let mut tcp = connect_from(from, gateway).await;
    // The gateway may already have closed (it need not wait for a refused peer to speak): then
    // this write fails, or succeeds and draws a reset. Either way the read below decides.
    if let Err(error) = tcp.write_all(bytes).await {
        assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "unexpected write error: {error}"
        );
    }
    let mut received = Vec::new();
    let ending = tokio::time::timeout(CLOSE_WITHIN, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => return None,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(error) => return Some(error),
            }
        }
    })
    .await
    .expect("the gateway closes a refused connection at once");
    if let Some(error) = ending {
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "unexpected read error: {error}"
        );
    }
    assert!(
        received.is_empty(),
        "a refused peer must get no byte (no ServerHello), got {} bytes: {:02x?}",
        received.len(),
        &received[..received.len().min(16)]
    );
}

/// The admin listener the harness enables.
fn admin(gateway: &TestGateway) -> SocketAddr {
    gateway
        .admin
        .expect("the harness enables the admin listener")
}

/// `bars_gateway_rejections_total{reason="<reason>"}`, 0 when never counted.
async fn rejections(gateway: &TestGateway, reason: &str) -> u64 {
    let series = format!("bars_gateway_rejections_total{{reason=\"{reason}\"}}");
    metric_of(admin(gateway), &series).await as u64
}

/// Asserts the one counted admission refusal reason is `reason`, `times` times, and that no TLS
/// handshake was even attempted.
async fn assert_counted_only(gateway: &TestGateway, reason: &str, times: u64) {
    assert_eq!(rejections(gateway, reason).await, times, "{reason}");
    let text = admin_get(admin(gateway), "/metrics").await;
    // Every known reason is exposed from the start at 0: count only the series that moved.
    let counted: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.starts_with("bars_gateway_rejections_total{")
                || line.starts_with("bars_gateway_tls_handshake_failures_total{")
        })
        .filter(|line| !line.ends_with(" 0"))
        .collect();
    assert_eq!(
        counted.len(),
        1,
        "only {reason} should be counted: {counted:#?}"
    );
}

/// Sends `GET /metadata` with the proxy's certificate over `tcp`, after `header` (if any).
async fn send_after(rig: &Rig, mut tcp: TcpStream, header: &[u8]) -> Reply2 {
    tcp.write_all(header).await.unwrap();
    send_on(
        tcp,
        rig.pki.client_config(Some(ClientCert::Proxy)),
        metadata(),
    )
    .await
    .expect("the request is served")
}

/// The one X-Forwarded-For the upstream saw.
fn forwarded_for(rig: &Rig) -> String {
    rig.upstream.only().headers["x-forwarded-for"]
        .to_str()
        .unwrap()
        .to_string()
}

// ---- direct peers -------------------------------------------------------------------------

#[tokio::test]
async fn refused_direct_peer_gets_no_byte_and_is_counted_as_ip_not_allowed() {
    let rig = Rig::start().await;
    let hello = client_hello(&rig);
    assert_refused_without_a_byte(rig.gateway.addr, STRANGER, &hello).await;
    assert_eq!(
        rig.upstream.count(),
        0,
        "a refused peer never reaches the upstream"
    );
    assert_counted_only(&rig.gateway, "ip_not_allowed", 1).await;
}

#[tokio::test]
async fn refused_direct_peer_gets_no_byte_whatever_it_sends() {
    let rig = Rig::start().await;
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        &v1_header(RELAYED, 40000),
        &[],
    ] {
        assert_refused_without_a_byte(rig.gateway.addr, STRANGER, bytes).await;
    }
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "ip_not_allowed", 3).await;
}

#[tokio::test]
async fn allowed_direct_peer_is_served_as_itself() {
    let rig = Rig::start().await;
    let tcp = connect_from(CLIENT, rig.gateway.addr).await;
    let reply = send_after(&rig, tcp, b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "127.0.0.1");
    assert_eq!(rejections(&rig.gateway, "ip_not_allowed").await, 0);
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused_without_a_byte() {
    // The peer is an allowed client, but not a trusted balancer: it may not claim to speak for
    // another address, with or without balancers configured.
    for with_balancer in [false, true] {
        let rig = Rig::start_with(|settings| {
            settings.client.allowed_ips = vec![net("127.0.0.1/32"), net("203.0.113.7/32")];
            if with_balancer {
                settings.listen.trusted_proxies = vec![net("127.0.0.3/32")];
            }
        })
        .await;
        let hello = client_hello(&rig);
        for header in [v1_header(RELAYED, 40000), v2_header(RELAYED, 40000)] {
            let bytes = [header, hello.clone()].concat();
            assert_refused_without_a_byte(rig.gateway.addr, CLIENT, &bytes).await;
        }
        assert_eq!(rig.upstream.count(), 0);
        assert_counted_only(&rig.gateway, "proxy_header_untrusted", 2).await;
    }
}

// ---- trusted L4 balancer --------------------------------------------------------------------

#[tokio::test]
async fn trusted_balancer_with_proxy_v1_is_served_on_behalf_of_the_relayed_client() {
    let rig = Rig::start_with(behind_balancer).await;
    let mut tcp = connect_from(BALANCER, rig.gateway.addr).await;
    tcp.write_all(&v1_header(RELAYED, 51234)).await.unwrap();
    // A client-supplied X-Forwarded-For is replaced, not trusted.
    let mut request = metadata();
    request
        .headers_mut()
        .insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    let reply = send_on(tcp, rig.pki.client_config(Some(ClientCert::Proxy)), request)
        .await
        .expect("the request is served");
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "203.0.113.7");
}

#[tokio::test]
async fn trusted_balancer_with_proxy_v2_is_served_on_behalf_of_the_relayed_client() {
    let rig = Rig::start_with(behind_balancer).await;
    let tcp = connect_from(BALANCER, rig.gateway.addr).await;
    let reply = send_after(&rig, tcp, &v2_header(RELAYED, 51234)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "203.0.113.7");
}

#[tokio::test]
async fn trusted_balancer_with_proxy_v2_relays_an_ipv6_client() {
    let rig = Rig::start_with(|settings| {
        behind_balancer(settings);
        settings.client.allowed_ips.push(net("2001:db8::/32"));
    })
    .await;
    let tcp = connect_from(BALANCER, rig.gateway.addr).await;
    let source: Ipv6Addr = "2001:db8::7".parse().unwrap();
    let reply = send_after(&rig, tcp, &v2_header_ipv6(source, 51234)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "2001:db8::7");
}

#[tokio::test]
async fn trusted_balancer_relaying_a_refused_client_gets_no_byte() {
    let rig = Rig::start_with(behind_balancer).await;
    let hello = client_hello(&rig);
    for header in [
        v1_header(RELAYED_STRANGER, 40000),
        v2_header(RELAYED_STRANGER, 40000),
    ] {
        let bytes = [header, hello.clone()].concat();
        assert_refused_without_a_byte(rig.gateway.addr, BALANCER, &bytes).await;
    }
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "ip_not_allowed", 2).await;
}

#[tokio::test]
async fn trusted_balancer_relaying_its_own_allowed_address_is_still_checked_by_the_header() {
    // The balancer's own address is allowed, but the header names a stranger: the header wins.
    let rig = Rig::start_with(|settings| {
        behind_balancer(settings);
        settings.client.allowed_ips.push(net("127.0.0.3/32"));
    })
    .await;
    let bytes = [v2_header(RELAYED_STRANGER, 40000), client_hello(&rig)].concat();
    assert_refused_without_a_byte(rig.gateway.addr, BALANCER, &bytes).await;
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "ip_not_allowed", 1).await;
}

#[tokio::test]
async fn trusted_balancer_without_a_proxy_header_is_refused_as_missing() {
    // Even though 127.0.0.3 would pass the allowlist as a direct client: a trusted balancer must
    // always say who it relays, or a misconfigured balancer would pass as the client itself.
    let rig = Rig::start_with(|settings| {
        behind_balancer(settings);
        settings.client.allowed_ips.push(net("127.0.0.3/32"));
    })
    .await;
    let hello = client_hello(&rig);
    assert_refused_without_a_byte(rig.gateway.addr, BALANCER, &hello).await;
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "proxy_header_missing", 1).await;
}

#[tokio::test]
async fn garbage_proxy_header_from_the_trusted_balancer_is_refused_as_malformed() {
    let rig = Rig::start_with(behind_balancer).await;
    let hello = client_hello(&rig);
    let mut v2_wrong_version = v2_header(RELAYED, 40000);
    v2_wrong_version[12] = 0x11; // version 1 in the v2 format
    let mut v2_truncated = V2_SIGNATURE.to_vec();
    v2_truncated.extend([0x21, 0x11, 0x00, 12, 203, 0, 113]);
    let headers = [
        b"PROXY TCP4 203.0.113.999 127.0.0.1 1 8443\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 8443\x00\x01\x02\r\n".to_vec(),
        b"PROXY TCP9 203.0.113.7 127.0.0.1 1 8443\r\n".to_vec(),
        v2_wrong_version,
    ];
    for header in &headers {
        let bytes = [header.clone(), hello.clone()].concat();
        assert_refused_without_a_byte(rig.gateway.addr, BALANCER, &bytes).await;
    }
    // Cut short: the balancer closes its side mid-header.
    let mut tcp = connect_from(BALANCER, rig.gateway.addr).await;
    tcp.write_all(&v2_truncated).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLOSE_WITHIN, tcp.read_to_end(&mut received))
        .await
        .expect("the gateway closes");
    assert!(
        read.is_ok() && received.is_empty(),
        "{read:?}, {received:?}"
    );

    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(
        &rig.gateway,
        "proxy_header_malformed",
        headers.len() as u64 + 1,
    )
    .await;
}

#[tokio::test]
async fn silent_trusted_balancer_is_closed_after_the_header_read_timeout() {
    let rig = Rig::start_with(|settings| {
        behind_balancer(settings);
        settings.listen.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    // Nothing written: the gateway's own deadline, not this test, ends the wait.
    assert_refused_without_a_byte(rig.gateway.addr, BALANCER, b"").await;
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "proxy_header_timeout", 1).await;
}

#[tokio::test]
async fn balancer_health_check_is_served_only_when_the_balancer_itself_is_allowed() {
    let health_checks = [v2_local_header(), b"PROXY UNKNOWN\r\n".to_vec()];

    let rig = Rig::start_with(|settings| {
        behind_balancer(settings);
        settings.client.allowed_ips.push(net("127.0.0.3/32"));
    })
    .await;
    for header in &health_checks {
        let tcp = connect_from(BALANCER, rig.gateway.addr).await;
        let reply = send_after(&rig, tcp, header).await;
        assert_eq!(reply.status, 200);
    }
    for seen in rig.upstream.seen() {
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.3");
    }
    assert_eq!(rig.upstream.count(), 2);

    let rig = Rig::start_with(behind_balancer).await;
    let hello = client_hello(&rig);
    for header in &health_checks {
        let bytes = [header.clone(), hello.clone()].concat();
        assert_refused_without_a_byte(rig.gateway.addr, BALANCER, &bytes).await;
    }
    assert_eq!(rig.upstream.count(), 0);
    // Counted apart from strangers, so health checks do not trip alerts on ip_not_allowed.
    assert_counted_only(&rig.gateway, "proxy_local", 2).await;
}

#[tokio::test]
async fn balancer_tcp_health_check_is_closed_quietly_as_io() {
    // Connect and close without a byte (a TCP health check without PROXY header): not reported
    // as a missing header, which would suggest the balancer is misconfigured.
    let rig = Rig::start_with(behind_balancer).await;
    let mut tcp = connect_from(BALANCER, rig.gateway.addr).await;
    tcp.shutdown().await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLOSE_WITHIN, tcp.read_to_end(&mut received))
        .await
        .expect("the gateway closes");
    assert!(
        read.is_ok() && received.is_empty(),
        "{read:?}, {received:?}"
    );
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "io", 1).await;
}

// ---- IPv6 -----------------------------------------------------------------------------------

/// Whether this host can listen on `address`; says so loudly on stderr when it cannot.
async fn can_listen_on(address: &str, test: &str) -> bool {
    match TcpListener::bind(address).await {
        Ok(_) => true,
        Err(error) => {
            skip(
                test,
                &format!("cannot listen on {address} ({error}); IPv6 loopback unavailable here"),
            );
            false
        }
    }
}

fn ipv6_settings(settings: &mut Settings, address: &str) {
    settings.listen.address = address.parse().unwrap();
    settings.client.allowed_ips = vec![net("::1/128")];
}

#[tokio::test]
async fn ipv6_client_is_served_when_its_address_is_allowed() {
    if !can_listen_on(
        "[::1]:0",
        "ipv6_client_is_served_when_its_address_is_allowed",
    )
    .await
    {
        return;
    }
    let rig = Rig::start_with(|settings| ipv6_settings(settings, "[::1]:0")).await;
    assert_eq!(rig.gateway.addr.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let reply = send_after(&rig, tcp, b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "::1");
}

#[tokio::test]
async fn ipv6_client_not_in_the_allowlist_gets_no_byte() {
    if !can_listen_on("[::1]:0", "ipv6_client_not_in_the_allowlist_gets_no_byte").await {
        return;
    }
    let rig = Rig::start_with(|settings| {
        ipv6_settings(settings, "[::1]:0");
        settings.client.allowed_ips = vec![net("2001:db8::/32"), net("127.0.0.1/32")];
    })
    .await;
    let hello = client_hello(&rig);
    let mut tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let _ = tcp.write_all(&hello).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLOSE_WITHIN, tcp.read_to_end(&mut received))
        .await
        .expect("the gateway closes a refused connection at once");
    if let Err(error) = read {
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }
    assert!(received.is_empty(), "{received:02x?}");
    assert_eq!(rig.upstream.count(), 0);
    assert_counted_only(&rig.gateway, "ip_not_allowed", 1).await;
}

#[tokio::test]
async fn ipv4_client_of_a_dual_stack_listener_is_matched_as_ipv4() {
    // A `[::]` listener reports IPv4 peers as ::ffff:a.b.c.d; the IPv4 allowlist must still match
    // them, and the upstream must see the plain IPv4 address.
    if !can_listen_on(
        "[::]:0",
        "ipv4_client_of_a_dual_stack_listener_is_matched_as_ipv4",
    )
    .await
    {
        return;
    }
    let rig = Rig::start_with(|settings| {
        settings.listen.address = "[::]:0".parse().unwrap();
    })
    .await;
    let port = rig.gateway.addr.port();
    let Ok(tcp) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return skip(
            "ipv4_client_of_a_dual_stack_listener_is_matched_as_ipv4",
            "the [::] listener does not accept IPv4 (net.ipv6.bindv6only=1?)",
        );
    };
    let reply = send_after(&rig, tcp, b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded_for(&rig), "127.0.0.1");

    let hello = client_hello(&rig);
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert_refused_without_a_byte(to, STRANGER, &hello).await;
    assert_eq!(rig.upstream.count(), 1);
    assert_counted_only(&rig.gateway, "ip_not_allowed", 1).await;
}
