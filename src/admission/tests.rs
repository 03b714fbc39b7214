//! Unit tests of admission: allowlist and CIDR parsing, PROXY v1/v2 reading, the decision, and
//! the refusal log limiter.

use super::limiter::*;
use super::policy::*;
use super::proxy::*;
use super::*;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::{TcpListener, TcpSocket};

/// The start of a TLS record carrying a ClientHello; enough to tell it from a PROXY header.
const CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03];
const BALANCER: [u8; 4] = [127, 0, 0, 3];
const REFUSED_PEER: [u8; 4] = [127, 0, 0, 2];

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn allowlist(cidrs: &[&str]) -> IpAllowlist {
    IpAllowlist::new(cidrs.iter().map(|c| parse_cidr(c).unwrap()).collect())
}

fn policy(allowed: &[&str], trusted: &[&str], timeout: Duration) -> AdmissionPolicy {
    AdmissionPolicy {
        allowed_ips: allowlist(allowed),
        trusted_proxies: allowlist(trusted),
        proxy_header_timeout: timeout,
    }
}

fn v2_proxy(source: &str, destination: &str) -> Vec<u8> {
    let addresses: ppp::v2::Addresses = (
        source.parse::<SocketAddr>().unwrap(),
        destination.parse::<SocketAddr>().unwrap(),
    )
        .into();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addresses,
    )
    .build()
    .unwrap()
}

fn v2_local() -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x20, 0x00, 0x00, 0x00]);
    header
}

/// Parses `input` from an in-memory reader; returns the outcome and the bytes left unread.
async fn parse(input: &[u8]) -> (Result<ProxyHeader, AdmissionError>, Vec<u8>) {
    let mut reader = input;
    let result = read_proxy_header(&mut reader).await;
    (result, reader.to_vec())
}

fn with_rest(header: &[u8]) -> Vec<u8> {
    let mut input = header.to_vec();
    input.extend_from_slice(b"REST");
    input
}

fn malformed_message(result: Result<ProxyHeader, AdmissionError>) -> String {
    match result {
        Err(AdmissionError::ProxyHeaderMalformed(message)) => message,
        other => panic!("expected ProxyHeaderMalformed, got {other:?}"),
    }
}

/// Hands out one byte per read: the worst case for a parser that must not overshoot.
struct OneByteAtATime<'a>(&'a [u8]);

impl AsyncRead for OneByteAtATime<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some((&first, rest)) = self.0.split_first() {
            if buf.remaining() > 0 {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
        }
        Poll::Ready(Ok(()))
    }
}

// ---- CIDR parsing and matching ----

#[test]
fn parse_cidr_accepts_an_ipv4_network() {
    let net = parse_cidr("34.89.0.111/32").unwrap();
    assert_eq!(net, "34.89.0.111/32".parse::<IpNet>().unwrap());
    assert_eq!(parse_cidr("10.0.0.0/8").unwrap().prefix_len(), 8);
}

#[test]
fn parse_cidr_accepts_an_ipv6_network() {
    assert_eq!(
        parse_cidr("2001:db8::/32").unwrap(),
        "2001:db8::/32".parse::<IpNet>().unwrap()
    );
}

#[test]
fn parse_cidr_reads_a_bare_address_as_a_single_host() {
    assert_eq!(parse_cidr("34.89.0.111").unwrap().prefix_len(), 32);
    assert_eq!(parse_cidr("2001:db8::1").unwrap().prefix_len(), 128);
    assert_eq!(parse_cidr("  35.197.254.55 ").unwrap().prefix_len(), 32);
}

#[test]
fn parse_cidr_refuses_garbage_and_says_what_it_expected() {
    for text in [
        "",
        "bars-proxy",
        "34.89.0",
        "34.89.0.256/32",
        "fe80::1%eth0",
        "/32",
    ] {
        let message = parse_cidr(text).unwrap_err();
        assert!(message.contains("expected"), "{text:?}: {message}");
    }
}

#[test]
fn parse_cidr_refuses_a_prefix_length_out_of_range_or_not_a_number() {
    for text in [
        "10.0.0.0/33",
        "2001:db8::/129",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0.0/x",
    ] {
        let message = parse_cidr(text).unwrap_err();
        assert!(message.contains("prefix length"), "{text:?}: {message}");
    }
}

#[test]
fn parse_cidr_refuses_host_bits_set_and_suggests_both_readings() {
    let message = parse_cidr("10.0.0.1/8").unwrap_err();
    assert!(message.contains("host bits"), "{message}");
    assert!(message.contains("10.0.0.0/8"), "{message}");
    assert!(message.contains("10.0.0.1/32"), "{message}");
    assert!(parse_cidr("2001:db8::1/32")
        .unwrap_err()
        .contains("2001:db8::/32"));
}

#[test]
fn allowlist_matches_addresses_inside_its_networks_only() {
    let list = allowlist(&["34.89.0.111/32", "10.1.0.0/16", "2001:db8::/32"]);
    assert!(list.contains(ip("34.89.0.111")));
    assert!(list.contains(ip("10.1.255.7")));
    assert!(list.contains(ip("2001:db8::42")));
    assert!(!list.contains(ip("34.89.0.112")));
    assert!(!list.contains(ip("10.2.0.1")));
    assert!(!list.contains(ip("2001:db9::1")));
}

#[test]
fn allowlist_matches_an_ipv4_mapped_ipv6_peer_against_ipv4_networks() {
    let list = allowlist(&["34.89.0.111/32"]);
    assert!(list.contains(ip("::ffff:34.89.0.111")));
    assert!(!list.contains(ip("::ffff:34.89.0.112")));
}

#[test]
fn allowlist_written_in_ipv4_mapped_form_matches_plain_ipv4_peers() {
    let list = allowlist(&["::ffff:10.0.0.0/104", "::ffff:34.89.0.111"]);
    assert_eq!(list.nets()[0], "10.0.0.0/8".parse::<IpNet>().unwrap());
    assert!(list.contains(ip("10.200.0.1")));
    assert!(list.contains(ip("34.89.0.111")));
    assert!(list.contains(ip("::ffff:34.89.0.111")));
}

#[test]
fn empty_allowlist_admits_nobody() {
    let list = IpAllowlist::new(Vec::new());
    assert!(list.is_empty());
    assert!(!list.contains(ip("127.0.0.1")));
    assert!(!list.contains(Ipv6Addr::LOCALHOST.into()));
}

// ---- PROXY header parsing ----

#[tokio::test]
async fn v1_tcp4_header_yields_the_source_and_leaves_the_next_bytes_unread() {
    let header = b"PROXY TCP4 34.89.0.111 10.0.0.5 51234 8443\r\n";
    let (result, rest) = parse(&with_rest(header)).await;
    assert_eq!(
        result.unwrap(),
        ProxyHeader::Proxied {
            source: "34.89.0.111:51234".parse().unwrap()
        }
    );
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v1_tcp6_header_yields_the_ipv6_source() {
    let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n";
    let (result, rest) = parse(&with_rest(header)).await;
    assert_eq!(
        result.unwrap(),
        ProxyHeader::Proxied {
            source: "[2001:db8::7]:40000".parse().unwrap()
        }
    );
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v1_unknown_is_a_local_connection_even_with_the_shortest_header() {
    let (result, rest) = parse(&with_rest(b"PROXY UNKNOWN\r\n")).await;
    assert_eq!(result.unwrap(), ProxyHeader::Local);
    assert_eq!(rest, b"REST");
    let (result, rest) = parse(&with_rest(b"PROXY UNKNOWN 10.0.0.1 10.0.0.2 1 2\r\n")).await;
    assert_eq!(result.unwrap(), ProxyHeader::Local);
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v1_header_read_one_byte_at_a_time_stops_exactly_at_the_crlf() {
    let input = with_rest(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 443\r\n");
    let mut reader = OneByteAtATime(&input);
    let header = read_proxy_header(&mut reader).await.unwrap();
    assert_eq!(
        header,
        ProxyHeader::Proxied {
            source: "203.0.113.7:1".parse().unwrap()
        }
    );
    assert_eq!(reader.0, b"REST");
}

#[tokio::test]
async fn v2_proxy_ipv4_header_yields_the_source_and_leaves_the_next_bytes_unread() {
    // Written out by hand from the specification, not with the parser's own builder.
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x11, 0x00, 0x0c]); // v2 PROXY, TCP over IPv4, 12 bytes
    header.extend([34, 89, 0, 111, 10, 0, 0, 5, 0xc8, 0x22, 0x20, 0xfb]);
    let (result, rest) = parse(&with_rest(&header)).await;
    assert_eq!(
        result.unwrap(),
        ProxyHeader::Proxied {
            source: "34.89.0.111:51234".parse().unwrap()
        }
    );
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v2_proxy_ipv6_header_yields_the_ipv6_source() {
    let header = v2_proxy("[2001:db8::7]:40000", "[2001:db8::1]:443");
    let (result, rest) = parse(&with_rest(&header)).await;
    assert_eq!(
        result.unwrap(),
        ProxyHeader::Proxied {
            source: "[2001:db8::7]:40000".parse().unwrap()
        }
    );
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v2_local_is_a_local_connection() {
    let (result, rest) = parse(&with_rest(&v2_local())).await;
    assert_eq!(result.unwrap(), ProxyHeader::Local);
    assert_eq!(rest, b"REST");
}

#[tokio::test]
async fn v2_header_with_tlvs_is_read_to_its_announced_end() {
    let addresses: ppp::v2::Addresses = (
        "34.89.69.6:40000".parse::<SocketAddr>().unwrap(),
        "10.0.0.5:8443".parse::<SocketAddr>().unwrap(),
    )
        .into();
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addresses,
    )
    .write_tlv(ppp::v2::Type::UniqueId, b"balancer-connection-42")
    .unwrap()
    .write_tlv(0xEA, b"vpce-0123456789abcdef")
    .unwrap()
    .build()
    .unwrap();
    let expected = ProxyHeader::Proxied {
        source: "34.89.69.6:40000".parse().unwrap(),
    };
    let input = with_rest(&header);
    let (result, rest) = parse(&input).await;
    assert_eq!(result.unwrap(), expected);
    assert_eq!(rest, b"REST");

    let mut reader = OneByteAtATime(&input);
    assert_eq!(read_proxy_header(&mut reader).await.unwrap(), expected);
    assert_eq!(reader.0, b"REST");
}

#[tokio::test]
async fn v2_proxy_over_unix_sockets_or_udp_is_refused_as_malformed() {
    let mut unix = V2_SIGNATURE.to_vec();
    unix.extend([0x21, 0x31, 0x00, 0xd8]);
    unix.extend([0u8; 216]);
    assert!(malformed_message(parse(&unix).await.0).contains("AF_UNIX"));

    let mut udp = V2_SIGNATURE.to_vec();
    udp.extend([0x21, 0x12, 0x00, 0x0c]);
    udp.extend([34, 89, 0, 111, 10, 0, 0, 5, 0, 1, 0, 2]);
    assert!(malformed_message(parse(&udp).await.0).contains("UDP"));
}

#[tokio::test]
async fn v2_header_announcing_more_than_1_kib_is_refused_before_reading_it() {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x11, 0xff, 0xff]);
    header.extend(b"PAYLOAD");
    let (result, rest) = parse(&header).await;
    assert!(malformed_message(result).contains("65535"));
    assert_eq!(rest, b"PAYLOAD");
}

#[tokio::test]
async fn v2_header_with_an_invalid_command_is_refused_before_its_addresses_are_read() {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x2f, 0x11, 0x00, 0x0c]);
    header.extend(b"ADDRESSES+12");
    let (result, rest) = parse(&header).await;
    assert!(malformed_message(result).contains("command"));
    assert_eq!(rest, b"ADDRESSES+12");
}

#[tokio::test]
async fn v2_header_with_a_wrong_version_or_broken_signature_is_malformed() {
    let mut version_one = V2_SIGNATURE.to_vec();
    version_one.extend([0x11, 0x11, 0x00, 0x0c]);
    version_one.extend([0u8; 12]);
    assert!(malformed_message(parse(&version_one).await.0).contains("v2"));

    let mut broken = b"\r\n\r\n\0\rXXXXXX".to_vec();
    broken.extend([0x21, 0x11, 0x00, 0x00]);
    assert!(malformed_message(parse(&broken).await.0).contains("signature"));
}

#[tokio::test]
async fn truncated_headers_are_malformed() {
    let v1 = b"PROXY TCP4 34.89.0.111 10.0.0.5 51234";
    let v2 = v2_proxy("34.89.0.111:51234", "10.0.0.5:8443");
    for input in [&v1[..], &v1[..3], &v2[..8], &v2[..20]] {
        let message = malformed_message(parse(input).await.0);
        assert!(message.contains("truncated"), "{input:?}: {message}");
    }
}

#[tokio::test]
async fn a_stream_without_a_proxy_header_is_reported_missing() {
    for input in [CLIENT_HELLO, b"GET / HTTP/1.1\r\n\r\n"] {
        let (result, _) = parse(input).await;
        assert!(
            matches!(result, Err(AdmissionError::ProxyHeaderMissing)),
            "{input:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_closed_before_any_byte_is_an_io_refusal_not_a_missing_header() {
    // A plain TCP health check: connect, close. Not a balancer misconfiguration.
    let (result, _) = parse(b"").await;
    let error = result.unwrap_err();
    assert_eq!(error.reason(), "io", "{error:?}");
}

#[tokio::test]
async fn v1_header_with_invalid_fields_is_malformed() {
    for input in [
        &b"PROXY tcp4 34.89.0.111 10.0.0.5 1 2\r\n"[..],
        b"PROXY TCP4 34.89.0.999 10.0.0.5 1 2\r\n",
        b"PROXY TCP4 34.89.0.111 10.0.0.5 99999 2\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.5 1 2\r\n",
        b"PROXY TCP4  34.89.0.111 10.0.0.5 1 2\r\n",
    ] {
        let (result, _) = parse(input).await;
        assert!(
            matches!(result, Err(AdmissionError::ProxyHeaderMalformed(_))),
            "{:?}: {result:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[tokio::test]
async fn v1_header_with_control_or_non_ascii_bytes_is_refused_at_once() {
    let (result, rest) = parse(b"PROXY TCP4 \x00\x01\x02 and more bytes after").await;
    assert!(malformed_message(result).contains("0x00"));
    assert!(
        !rest.is_empty(),
        "stopped early instead of reading to the limit"
    );
    let (result, _) = parse(b"PROXY TCP4 34.89.0.111\n10.0.0.5 1 2\r\n").await;
    assert!(malformed_message(result).contains("0x0a"));
    let (result, _) = parse(b"PROXY TCP4 34.89.0.111\r10.0.0.5 1 2\r\n").await;
    assert!(malformed_message(result).contains("0x0d"));
}

#[tokio::test]
async fn v1_header_longer_than_107_bytes_is_refused_without_reading_past_the_limit() {
    let mut input = b"PROXY UNKNOWN ".to_vec();
    input.resize(300, b'x');
    let (result, rest) = parse(&input).await;
    assert!(malformed_message(result).contains("107"));
    assert!(
        rest.len() >= 300 - V1_MAX_LEN,
        "read {} bytes",
        300 - rest.len()
    );
}

#[tokio::test]
async fn proxy_header_that_never_arrives_times_out() {
    let (_silent_writer, mut reader) = tokio::io::duplex(64);
    let result = read_proxy_header_within(&mut reader, Duration::from_millis(20)).await;
    assert!(
        matches!(result, Err(AdmissionError::ProxyHeaderTimeout)),
        "{result:?}"
    );
}

#[tokio::test]
async fn proxy_header_dripped_slower_than_the_deadline_times_out_mid_header() {
    let (mut writer, mut reader) = tokio::io::duplex(64);
    writer.write_all(b"PROXY TCP4 34.89").await.unwrap();
    let result = read_proxy_header_within(&mut reader, Duration::from_millis(20)).await;
    assert!(
        matches!(result, Err(AdmissionError::ProxyHeaderTimeout)),
        "{result:?}"
    );
}

#[test]
fn first_bytes_are_judged_as_proxy_header_or_not() {
    assert!(starts_like_proxy_header(b"PROXY TCP4"));
    assert!(starts_like_proxy_header(b"P"));
    assert!(starts_like_proxy_header(V2_SIGNATURE));
    assert!(starts_like_proxy_header(b"\r\n\r"));
    assert!(!starts_like_proxy_header(CLIENT_HELLO));
    assert!(!starts_like_proxy_header(b"POST / HTTP/1.1"));
    assert!(!starts_like_proxy_header(b""));
}

#[test]
fn error_reasons_are_the_metric_labels() {
    let cases = [
        (
            AdmissionError::IpNotAllowed { ip: ip("10.0.0.1") },
            "ip_not_allowed",
        ),
        (
            AdmissionError::LocalNotAllowed {
                balancer: ip("10.0.0.2"),
            },
            "proxy_local",
        ),
        (AdmissionError::ProxyHeaderMissing, "proxy_header_missing"),
        (
            AdmissionError::ProxyHeaderUntrusted,
            "proxy_header_untrusted",
        ),
        (
            AdmissionError::ProxyHeaderMalformed("x".into()),
            "proxy_header_malformed",
        ),
        (AdmissionError::ProxyHeaderTimeout, "proxy_header_timeout"),
        (
            AdmissionError::Io(std::io::ErrorKind::ConnectionReset.into()),
            "io",
        ),
    ];
    for (error, reason) in cases {
        assert_eq!(error.reason(), reason);
    }
    let refused = AdmissionError::IpNotAllowed { ip: ip("10.0.0.1") };
    assert_eq!(refused.client_ip(), Some(ip("10.0.0.1")));
    assert_eq!(AdmissionError::ProxyHeaderTimeout.client_ip(), None);
}

// ---- admit_peer over real loopback TCP ----

/// A connection from `source` (any 127/8 address is local on Linux) to a fresh listener.
async fn connect_from(source: [u8; 4]) -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let client = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, peer) = listener.accept().await.unwrap();
    assert_eq!(peer.ip(), IpAddr::from(source));
    (client, server, peer)
}

/// Admission must finish on its own; this guard only turns a hang into a failure.
async fn admit(
    server: &mut TcpStream,
    peer: SocketAddr,
    policy: &AdmissionPolicy,
) -> Result<Admitted, AdmissionError> {
    tokio::time::timeout(Duration::from_secs(10), admit_peer(server, peer, policy))
        .await
        .expect("admission hung")
}

async fn assert_next_bytes(server: &mut TcpStream, expected: &[u8]) {
    let mut seen = vec![0u8; expected.len()];
    server.read_exact(&mut seen).await.unwrap();
    assert_eq!(seen, expected);
}

/// The client sees the close with no byte from the server (EOF, or a reset because unread data
/// was left in the server's receive buffer).
async fn assert_closed_without_a_byte(client: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match client.read(&mut buf).await {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF or reset with no data, got {other:?}"),
    }
}

#[tokio::test]
async fn allowed_direct_peer_is_admitted_with_its_client_hello_unread() {
    let (mut client, mut server, peer) = connect_from([127, 0, 0, 1]).await;
    client.write_all(CLIENT_HELLO).await.unwrap();
    let policy = policy(&["127.0.0.1/32"], &[], Duration::from_secs(5));
    let admitted = admit(&mut server, peer, &policy).await.unwrap();
    assert_eq!(
        admitted,
        Admitted {
            client: peer,
            via_proxy: None
        }
    );
    assert_next_bytes(&mut server, CLIENT_HELLO).await;
}

#[tokio::test]
async fn refused_direct_peer_is_closed_before_any_byte_is_read_or_written() {
    let (mut client, mut server, peer) = connect_from(REFUSED_PEER).await;
    client.write_all(CLIENT_HELLO).await.unwrap();
    let policy = policy(&["127.0.0.1/32"], &["127.0.0.3/32"], Duration::from_secs(5));
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert!(
        matches!(error, AdmissionError::IpNotAllowed { ip } if ip == IpAddr::from(REFUSED_PEER)),
        "{error:?}"
    );
    // Nothing was consumed: the ClientHello still starts at the first byte.
    let mut first = [0u8; 1];
    assert_eq!(server.peek(&mut first).await.unwrap(), 1);
    assert_eq!(first[0], TLS_HANDSHAKE_RECORD);
    drop(server);
    assert_closed_without_a_byte(&mut client).await;
}

#[tokio::test]
async fn refused_direct_peer_is_refused_without_waiting_for_it_to_speak() {
    let (mut client, mut server, peer) = connect_from(REFUSED_PEER).await;
    // A long header timeout: only the admit() guard would end a wait for the first byte.
    let policy = policy(&["127.0.0.1/32"], &[], Duration::from_secs(3600));
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert_eq!(error.reason(), "ip_not_allowed");
    drop(server);
    assert_closed_without_a_byte(&mut client).await;
}

async fn admit_through_balancer(
    header: &[u8],
    allowed: &[&str],
) -> (Result<Admitted, AdmissionError>, TcpStream) {
    let (mut client, mut server, peer) = connect_from(BALANCER).await;
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(CLIENT_HELLO);
    client.write_all(&bytes).await.unwrap();
    let policy = policy(allowed, &["127.0.0.3/32"], Duration::from_secs(5));
    let result = admit(&mut server, peer, &policy).await;
    if result.is_ok() {
        assert_next_bytes(&mut server, CLIENT_HELLO).await;
    }
    (result, client)
}

fn through_balancer(client: &str) -> Admitted {
    Admitted {
        client: client.parse().unwrap(),
        via_proxy: Some(IpAddr::from(BALANCER)),
    }
}

#[tokio::test]
async fn trusted_proxy_v1_with_an_allowed_source_admits_that_source() {
    let header = b"PROXY TCP4 34.89.0.111 127.0.0.1 51234 8443\r\n";
    let (result, _client) = admit_through_balancer(header, &["34.89.0.111/32"]).await;
    assert_eq!(result.unwrap(), through_balancer("34.89.0.111:51234"));
}

#[tokio::test]
async fn trusted_proxy_v1_with_a_refused_source_is_refused_for_that_source() {
    let header = b"PROXY TCP4 203.0.113.9 127.0.0.1 51234 8443\r\n";
    let (result, _client) = admit_through_balancer(header, &["34.89.0.111/32"]).await;
    let error = result.unwrap_err();
    assert_eq!(error.client_ip(), Some(ip("203.0.113.9")), "{error:?}");
}

#[tokio::test]
async fn trusted_proxy_v2_with_an_allowed_source_admits_that_source() {
    let header = v2_proxy("34.89.69.6:40000", "127.0.0.1:8443");
    let (result, _client) = admit_through_balancer(&header, &["34.89.69.6/32"]).await;
    assert_eq!(result.unwrap(), through_balancer("34.89.69.6:40000"));
}

#[tokio::test]
async fn trusted_proxy_v2_with_a_refused_source_is_refused_for_that_source() {
    let header = v2_proxy("[2001:db8::9]:40000", "[2001:db8::1]:8443");
    let (result, _client) = admit_through_balancer(&header, &["34.89.69.6/32"]).await;
    let error = result.unwrap_err();
    assert_eq!(error.client_ip(), Some(ip("2001:db8::9")), "{error:?}");
}

#[tokio::test]
async fn trusted_proxy_source_in_ipv4_mapped_form_is_admitted_as_ipv4() {
    let header = b"PROXY TCP6 ::ffff:34.89.0.111 ::ffff:127.0.0.1 51234 8443\r\n";
    let (result, _client) = admit_through_balancer(header, &["34.89.0.111/32"]).await;
    assert_eq!(result.unwrap(), through_balancer("34.89.0.111:51234"));
}

#[tokio::test]
async fn balancer_health_check_is_admitted_only_when_the_balancer_is_allowed() {
    for header in [v2_local(), b"PROXY UNKNOWN\r\n".to_vec()] {
        let (result, _client) =
            admit_through_balancer(&header, &["34.89.0.111/32", "127.0.0.3/32"]).await;
        let balancer = SocketAddr::new(
            IpAddr::from(BALANCER),
            result.as_ref().unwrap().client.port(),
        );
        assert_eq!(
            result.unwrap(),
            Admitted {
                client: balancer,
                via_proxy: Some(IpAddr::from(BALANCER))
            }
        );

        let (result, _client) = admit_through_balancer(&header, &["34.89.0.111/32"]).await;
        let error = result.unwrap_err();
        assert!(
            matches!(error, AdmissionError::LocalNotAllowed { balancer } if balancer == IpAddr::from(BALANCER)),
            "{error:?}"
        );
        assert_eq!(error.reason(), "proxy_local");
        assert_eq!(error.client_ip(), Some(IpAddr::from(BALANCER)));
    }
}

#[tokio::test]
async fn trusted_proxy_without_a_header_is_refused() {
    let (result, _client) = admit_through_balancer(b"", &["127.0.0.3/32"]).await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, AdmissionError::ProxyHeaderMissing),
        "{error:?}"
    );
}

#[tokio::test]
async fn trusted_proxy_that_connects_and_closes_is_an_io_refusal() {
    let (client, mut server, peer) = connect_from(BALANCER).await;
    drop(client);
    let policy = policy(
        &["34.89.0.111/32"],
        &["127.0.0.3/32"],
        Duration::from_secs(5),
    );
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert_eq!(error.reason(), "io", "{error:?}");
}

#[tokio::test]
async fn trusted_proxy_that_sends_nothing_times_out() {
    let (_client, mut server, peer) = connect_from(BALANCER).await;
    let policy = policy(
        &["34.89.0.111/32"],
        &["127.0.0.3/32"],
        Duration::from_millis(50),
    );
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert!(
        matches!(error, AdmissionError::ProxyHeaderTimeout),
        "{error:?}"
    );
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused() {
    let headers = [
        b"PROXY TCP4 34.89.0.111 127.0.0.1 51234 8443\r\n".to_vec(),
        v2_proxy("34.89.0.111:51234", "127.0.0.1:8443"),
    ];
    for trusted in [&["127.0.0.3/32"][..], &[]] {
        for header in &headers {
            let (mut client, mut server, peer) = connect_from([127, 0, 0, 1]).await;
            client.write_all(header).await.unwrap();
            let policy = policy(
                &["127.0.0.1/32", "34.89.0.111/32"],
                trusted,
                Duration::from_secs(5),
            );
            let error = admit(&mut server, peer, &policy).await.unwrap_err();
            assert!(
                matches!(error, AdmissionError::ProxyHeaderUntrusted),
                "{error:?}"
            );
        }
    }
}

#[tokio::test]
async fn allowed_direct_peer_that_sends_nothing_times_out() {
    let (_client, mut server, peer) = connect_from([127, 0, 0, 1]).await;
    let policy = policy(&["127.0.0.1/32"], &[], Duration::from_millis(50));
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert!(
        matches!(error, AdmissionError::ProxyHeaderTimeout),
        "{error:?}"
    );
}

#[tokio::test]
async fn allowed_direct_peer_that_closes_without_a_byte_is_an_io_refusal() {
    let (client, mut server, peer) = connect_from([127, 0, 0, 1]).await;
    drop(client);
    let policy = policy(&["127.0.0.1/32"], &[], Duration::from_secs(5));
    let error = admit(&mut server, peer, &policy).await.unwrap_err();
    assert_eq!(error.reason(), "io", "{error:?}");
}

// ---- RefusalLogLimiter ----

#[test]
fn second_refusal_from_an_address_within_the_interval_is_not_logged() {
    let limiter = RefusalLogLimiter::new(Duration::from_secs(60), 100);
    let start = Instant::now();
    assert!(limiter.should_log(ip("203.0.113.9"), start));
    assert!(!limiter.should_log(ip("203.0.113.9"), start + Duration::from_secs(59)));
    assert!(!limiter.should_log(ip("::ffff:203.0.113.9"), start + Duration::from_secs(59)));
    assert!(limiter.should_log(ip("203.0.113.10"), start + Duration::from_secs(1)));
}

#[test]
fn refusal_after_the_interval_is_logged_again() {
    let limiter = RefusalLogLimiter::new(Duration::from_secs(60), 100);
    let start = Instant::now();
    assert!(limiter.should_log(ip("203.0.113.9"), start));
    assert!(limiter.should_log(ip("203.0.113.9"), start + Duration::from_secs(60)));
    assert!(!limiter.should_log(ip("203.0.113.9"), start + Duration::from_secs(61)));
}

#[test]
fn address_spray_is_bounded_in_memory_and_in_log_lines() {
    let limiter = RefusalLogLimiter::new(Duration::from_secs(60), 100);
    let start = Instant::now();
    let logged = (0..10_000u32)
        .filter(|n| limiter.should_log(IpAddr::from(Ipv4Addr::from(*n)), start))
        .count();
    assert_eq!(logged, 100);
    assert_eq!(limiter.tracked(), 100);

    // Once the interval has passed, room frees up for new addresses.
    let later = start + Duration::from_secs(60);
    assert!(limiter.should_log(ip("198.51.100.1"), later));
    assert_eq!(limiter.tracked(), 1);
}

#[test]
fn limiter_is_shared_across_threads() {
    let limiter = std::sync::Arc::new(RefusalLogLimiter::new(Duration::from_secs(60), 1000));
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let limiter = limiter.clone();
            std::thread::spawn(move || {
                (0..100u32)
                    .filter(|n| limiter.should_log(IpAddr::from(Ipv4Addr::from(*n)), start))
                    .count()
            })
        })
        .collect();
    let logged: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(
        logged, 100,
        "each address logged exactly once across threads"
    );
}
