//! Admission: who may reach the TLS handshake, decided at TCP accept before any TLS byte moves.
//!
//! The central BaRS proxy connects from two fixed addresses per environment (DESIGN.md §3,
//! `client.allowed_ips`), so every other peer is closed before the TLS handshake: an internet
//! scanner never sees our certificate nor costs us a handshake. When the gateway sits behind an L4
//! load balancer (`listen.trusted_proxies`), the balancer prepends a PROXY header carrying the real
//! client address, and the allowlist applies to that address instead.
//!
//! Order of checks in [`admit_peer`]:
//! 1. peer in `trusted_proxies`: a PROXY header is required; `allowed_ips` applies to the address
//!    it carries (or to the balancer itself for a LOCAL / UNKNOWN health check).
//! 2. any other peer: `allowed_ips` applies to the peer address first, with nothing read; then one
//!    `peek` tells a TLS ClientHello from a PROXY header the peer is not trusted to send.
//!
//! Every address is compared in canonical form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what
//! a dual-stack `[::]` listener reports for IPv4 peers) is treated as the IPv4 address.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::rejection::RejectionReason;

/// The 12-byte signature every PROXY protocol v2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What every PROXY protocol v1 header starts with.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Bytes read before deciding between v1 and v2: both prefixes are at least this long.
const SNIFF_LEN: usize = 6;
/// The shortest valid v1 header is `PROXY UNKNOWN\r\n`; reading this many bytes up front can only
/// overshoot a header that is invalid anyway.
const V1_MIN_LEN: usize = 15;
/// The v1 specification's upper bound, CRLF included.
const V1_MAX_LEN: usize = 107;
/// Signature, version/command, family/protocol and the 2-byte length.
const V2_FIXED_LEN: usize = 16;
/// Largest v2 address + TLV block accepted. IPv6 addresses take 36 bytes and balancers add a few
/// small TLVs (AWS VPC endpoint id, GCP PSC id, HAProxy unique id), so 1 KiB is generous; the
/// 16-bit length field would otherwise let a peer make us buffer 64 KiB per connection.
pub const V2_MAX_PAYLOAD: usize = 1024;
/// First byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// CIDR list; matching normalises IPv4-mapped IPv6 (::ffff:a.b.c.d) to IPv4.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpAllowlist {
    nets: Vec<IpNet>,
}

impl IpAllowlist {
    /// Builds the list, storing IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) as IPv4.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self {
            nets: nets.into_iter().map(canonical_net).collect(),
        }
    }

    /// Whether `ip`, canonicalised, is in one of the networks; an empty list contains nothing.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// Whether the list has no network at all.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The networks, as normalised by [`IpAllowlist::new`] (for `check` reports and logs).
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// An IPv4-mapped IPv6 network becomes the IPv4 network it maps; every other network is unchanged.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                // prefix_len - 96 is at most 32, so Ipv4Net::new cannot fail; keep the original
                // network rather than unwrap if that ever changed.
                return Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .map(IpNet::V4)
                    .unwrap_or(net);
            }
        }
    }
    net
}

/// Parse one CIDR or bare address ("34.89.0.111/32", "34.89.0.111", "2001:db8::/32") for config;
/// the error message says what is wrong (config.rs adds the file and key).
///
/// A network written with host bits set ("10.0.0.1/8") is refused rather than silently widened or
/// narrowed: in an allowlist it is almost always a typo for a /32 or a mistaken prefix, and both
/// readings differ by millions of addresses.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "empty address; expected a CIDR such as \"34.89.0.111/32\" or a bare address".into(),
        );
    }
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        format!(
            "{addr_text:?} is not an IPv4 or IPv6 address; expected a CIDR such as \"34.89.0.111/32\", \"2001:db8::/32\" or a bare address"
        )
    })?;
    let (max_prefix, family) = match addr {
        IpAddr::V4(_) => (32u8, "IPv4"),
        IpAddr::V6(_) => (128u8, "IPv6"),
    };
    let prefix = match prefix_text {
        None => max_prefix,
        Some(prefix_text) => {
            // u8::from_str accepts a leading '+'; a prefix length is plain digits.
            let digits = !prefix_text.is_empty() && prefix_text.bytes().all(|b| b.is_ascii_digit());
            digits
                .then(|| prefix_text.parse::<u8>().ok())
                .flatten()
                .filter(|prefix| *prefix <= max_prefix)
                .ok_or_else(|| {
                    format!(
                        "prefix length {prefix_text:?} in {text:?} must be a number from 0 to {max_prefix} for an {family} address"
                    )
                })?
        }
    };
    let net = IpNet::new(addr, prefix).map_err(|error| format!("{text:?}: {error}"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: the /{prefix} network containing it is {}; write that network, or {addr}/{max_prefix} for the single address",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Built once at config load / reload, shared read-only.
#[derive(Debug, Clone)]
pub struct AdmissionPolicy {
    /// `client.allowed_ips`: the client addresses admitted; empty admits nobody.
    pub allowed_ips: IpAllowlist,
    /// `listen.trusted_proxies`: balancers that may, and must, send a PROXY header.
    pub trusted_proxies: IpAllowlist,
    /// Limit on waiting for the PROXY header (trusted peers) or the first byte (direct peers).
    pub proxy_header_timeout: Duration,
}

/// A connection allowed to proceed to the TLS handshake, with the address it is on behalf of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The client (from the PROXY header, else the TCP peer), IPv4-mapped addresses canonicalised.
    pub client: SocketAddr,
    /// The trusted balancer the connection came through, if any.
    pub via_proxy: Option<IpAddr>,
}

/// Why a connection was closed at admission; [`AdmissionError::reason`] is the metric/log label.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The client address is not in `client.allowed_ips`.
    #[error("client address {ip} is not in client.allowed_ips")]
    IpNotAllowed {
        /// The refused client address (from the PROXY header when the peer is a trusted balancer).
        ip: IpAddr,
    },
    /// A trusted balancer's LOCAL / UNKNOWN header (its own health check), and the balancer's own
    /// address is not in `client.allowed_ips`. Told apart from `IpNotAllowed` so that a balancer
    /// probing every few seconds neither inflates the count operators alert on for strangers nor
    /// writes a log line every minute.
    #[error("health check (PROXY LOCAL / UNKNOWN) from balancer {balancer}, which is not in client.allowed_ips")]
    LocalNotAllowed {
        /// The balancer's address.
        balancer: IpAddr,
    },
    /// A peer in `listen.trusted_proxies` did not start with a PROXY header.
    #[error("peer is in listen.trusted_proxies but did not start with a PROXY protocol header")]
    ProxyHeaderMissing,
    /// A peer not in `listen.trusted_proxies` sent a PROXY header (unlisted balancer, or spoofing).
    #[error("peer sent a PROXY protocol header but is not in listen.trusted_proxies")]
    ProxyHeaderUntrusted,
    /// The PROXY header started correctly but is invalid, truncated or too long.
    #[error("malformed PROXY protocol header: {0}")]
    ProxyHeaderMalformed(String),
    /// The peer sent no complete PROXY header (trusted) or no first byte (direct) in time.
    #[error("timed out waiting for the peer's PROXY header or first byte")]
    ProxyHeaderTimeout,
    /// The socket failed, or the peer closed it before sending anything.
    #[error("i/o error before the TLS handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl AdmissionError {
    /// The `reason` of `bars_gateway_rejections_total` this refusal is counted under.
    pub fn rejection(&self) -> RejectionReason {
        match self {
            Self::IpNotAllowed { .. } => RejectionReason::IpNotAllowed,
            Self::LocalNotAllowed { .. } => RejectionReason::ProxyLocal,
            Self::ProxyHeaderMissing => RejectionReason::ProxyHeaderMissing,
            Self::ProxyHeaderUntrusted => RejectionReason::ProxyHeaderUntrusted,
            Self::ProxyHeaderMalformed(_) => RejectionReason::ProxyHeaderMalformed,
            Self::ProxyHeaderTimeout => RejectionReason::ProxyHeaderTimeout,
            Self::Io(_) => RejectionReason::Io,
        }
    }

    /// The `reason` label of `bars_gateway_rejections_total` and of the refusal log line.
    pub fn reason(&self) -> &'static str {
        self.rejection().as_str()
    }

    /// The client address a refusal is about when known (IpNotAllowed); else log the TCP peer.
    pub fn client_ip(&self) -> Option<IpAddr> {
        match self {
            Self::IpNotAllowed { ip } => Some(*ip),
            Self::LocalNotAllowed { balancer } => Some(*balancer),
            _ => None,
        }
    }
}

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer relays a client connection from `source`.
    Proxied {
        /// The client address and port as the balancer saw them.
        source: SocketAddr,
    },
    /// The balancer speaks for itself (v2 LOCAL, v1 UNKNOWN, v2 AF_UNSPEC), e.g. a health check.
    Local,
}

/// The whole admission step for one accepted TCP connection.
///
/// A peer in both lists is treated as a balancer: once trusted to speak for others it must always
/// send a header, otherwise a balancer misconfigured to omit it would pass as the client itself.
/// For a LOCAL / UNKNOWN header (balancer health checks) the client is the balancer, and
/// `allowed_ips` applies to the balancer's address: list it there to let health checks reach the
/// TLS listener, or leave it out and they are refused here as `proxy_local`, not `ip_not_allowed`
/// (a TCP health check still sees the accept). Direct peers are checked before anything is read, so a refused peer is closed without a
/// byte read or written.
pub async fn admit_peer(
    stream: &mut TcpStream,
    peer: SocketAddr,
    policy: &AdmissionPolicy,
) -> Result<Admitted, AdmissionError> {
    let peer = canonical_socket_addr(peer);
    if policy.trusted_proxies.contains(peer.ip()) {
        let header = read_proxy_header_within(stream, policy.proxy_header_timeout).await?;
        let client = match header {
            ProxyHeader::Proxied { source } => canonical_socket_addr(source),
            ProxyHeader::Local => peer,
        };
        if !policy.allowed_ips.contains(client.ip()) {
            return Err(match header {
                ProxyHeader::Proxied { .. } => AdmissionError::IpNotAllowed { ip: client.ip() },
                ProxyHeader::Local => AdmissionError::LocalNotAllowed {
                    balancer: peer.ip(),
                },
            });
        }
        debug!(peer = %peer, client = %client, "admitted through trusted proxy");
        return Ok(Admitted {
            client,
            via_proxy: Some(peer.ip()),
        });
    }

    if !policy.allowed_ips.contains(peer.ip()) {
        return Err(AdmissionError::IpNotAllowed { ip: peer.ip() });
    }
    // Peeked even when no balancer is configured: a balancer sending PROXY headers to a gateway
    // that does not expect them (or a client-IP-preserving balancer, such as an NLB with PROXY v2
    // on) would otherwise surface as an opaque TLS "corrupt message" error. A TLS client speaks
    // first anyway, so waiting for its first byte costs one syscall and no latency.
    let mut first = [0u8; V2_SIGNATURE.len()];
    let peeked = tokio::time::timeout(policy.proxy_header_timeout, stream.peek(&mut first))
        .await
        .map_err(|_| AdmissionError::ProxyHeaderTimeout)??;
    if peeked == 0 {
        return Err(closed_before_any_byte());
    }
    if starts_like_proxy_header(&first[..peeked]) {
        return Err(AdmissionError::ProxyHeaderUntrusted);
    }
    debug!(peer = %peer, "admitted direct peer");
    Ok(Admitted {
        client: peer,
        via_proxy: None,
    })
}

/// Whether the first bytes are consistent with a PROXY v1 or v2 signature.
///
/// Judged on whatever one peek returned, possibly a single byte: waiting for more would mean a
/// polling loop (peek does not clear readiness), and a stream starting with `P` or `\r` is not a
/// TLS handshake (always 0x16) so it fails the handshake anyway; only the log reason is at stake.
fn starts_like_proxy_header(bytes: &[u8]) -> bool {
    if bytes.first() == Some(&TLS_HANDSHAKE_RECORD) {
        return false;
    }
    let v1 = bytes.len().min(V1_PREFIX.len());
    let v2 = bytes.len().min(V2_SIGNATURE.len());
    !bytes.is_empty() && (bytes[..v1] == V1_PREFIX[..v1] || bytes[..v2] == V2_SIGNATURE[..v2])
}

/// The address with an IPv4-mapped IP replaced by the IPv4 one, for matching and for logs.
fn canonical_socket_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// [`read_proxy_header`] with one deadline over the whole header, so a slow-drip peer cannot hold
/// the connection open byte by byte.
async fn read_proxy_header_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: Duration,
) -> Result<ProxyHeader, AdmissionError> {
    tokio::time::timeout(limit, read_proxy_header(reader))
        .await
        .map_err(|_| AdmissionError::ProxyHeaderTimeout)?
}

/// Reads exactly one PROXY v1 or v2 header and not one byte more (the TLS ClientHello follows on the
/// same stream). Generic so it can be tested on in-memory streams.
///
/// It has no deadline of its own (admit_peer puts one over the whole header). It never reads past
/// the header: v1 in chunks no longer than the shortest possible rest of a valid header (about 20
/// small reads for a TCP4 line, negligible at the BaRS proxy's connection rate and simpler than
/// any buffering scheme), v2 in three exact reads driven by its length field.
pub async fn read_proxy_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ProxyHeader, AdmissionError> {
    let mut buf = [0u8; V2_FIXED_LEN + V2_MAX_PAYLOAD];
    let got = read_until_full_or_eof(reader, &mut buf[..SNIFF_LEN]).await?;
    let start = &buf[..got];
    if start == V1_PREFIX {
        read_v1_rest(reader, &mut buf[..V1_MAX_LEN]).await
    } else if start == &V2_SIGNATURE[..SNIFF_LEN] {
        read_v2_rest(reader, &mut buf).await
    } else if !start.is_empty() && (V1_PREFIX.starts_with(start) || V2_SIGNATURE.starts_with(start))
    {
        Err(truncated(got))
    } else if start.is_empty() {
        // A plain TCP health check (connect, close) or a client giving up: nothing to say about
        // the balancer's configuration, so the same quiet `io` refusal as a silent direct peer.
        Err(closed_before_any_byte())
    } else {
        // A TLS ClientHello (0x16...) or anything else that is not a PROXY header.
        Err(AdmissionError::ProxyHeaderMissing)
    }
}

/// Reads the rest of a v1 header whose first [`SNIFF_LEN`] bytes are already in `buf`.
async fn read_v1_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<ProxyHeader, AdmissionError> {
    let mut len = SNIFF_LEN;
    read_exact_or_truncated(reader, buf, len, V1_MIN_LEN).await?;
    len = V1_MIN_LEN;
    loop {
        check_v1_bytes(&buf[..len])?;
        if buf[..len].ends_with(b"\r\n") {
            break;
        }
        // Shortest possible rest of a valid header: "\n" after a '\r', else at least "\r\n".
        let need = if buf[len - 1] == b'\r' { 1 } else { 2 };
        if len + need > V1_MAX_LEN {
            return Err(AdmissionError::ProxyHeaderMalformed(format!(
                "v1 header has no CRLF within {V1_MAX_LEN} bytes"
            )));
        }
        read_exact_or_truncated(reader, buf, len, len + need).await?;
        len += need;
    }
    let header = ppp::v1::Header::try_from(&buf[..len])
        .map_err(|error| AdmissionError::ProxyHeaderMalformed(format!("v1: {error}")))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        },
        ppp::v1::Addresses::Tcp6(a) => ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        },
        ppp::v1::Addresses::Unknown => ProxyHeader::Local,
    })
}

/// A v1 header is printable ASCII ending in CRLF; refusing anything else early stops a peer from
/// feeding binary garbage until the 107-byte limit.
fn check_v1_bytes(bytes: &[u8]) -> Result<(), AdmissionError> {
    let last = bytes.len().saturating_sub(1);
    for (offset, &byte) in bytes.iter().enumerate() {
        let fine = match byte {
            b'\r' => offset == last || (offset + 1 == last && bytes[last] == b'\n'),
            b'\n' => offset == last && offset > 0 && bytes[offset - 1] == b'\r',
            _ => byte == b' ' || byte.is_ascii_graphic(),
        };
        if !fine {
            return Err(AdmissionError::ProxyHeaderMalformed(format!(
                "v1 header has unexpected byte {byte:#04x} at offset {offset}"
            )));
        }
    }
    Ok(())
}

/// Reads the rest of a v2 header whose first [`SNIFF_LEN`] bytes are already in `buf`.
async fn read_v2_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8; V2_FIXED_LEN + V2_MAX_PAYLOAD],
) -> Result<ProxyHeader, AdmissionError> {
    read_exact_or_truncated(reader, buf, SNIFF_LEN, V2_FIXED_LEN).await?;
    if buf[..V2_SIGNATURE.len()] != V2_SIGNATURE[..] {
        return Err(AdmissionError::ProxyHeaderMalformed(
            "v2 signature is incomplete".into(),
        ));
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(AdmissionError::ProxyHeaderMalformed(format!(
            "v2 header announces {payload} bytes of addresses and TLVs; more than {V2_MAX_PAYLOAD} is refused"
        )));
    }
    let total = V2_FIXED_LEN + payload;
    read_exact_or_truncated(reader, buf, V2_FIXED_LEN, total).await?;
    // TLVs are not validated: none is used here, and the length field already bounds the header.
    let header = ppp::v2::Header::try_from(&buf[..total])
        .map_err(|error| AdmissionError::ProxyHeaderMalformed(format!("v2: {error}")))?;
    if header.command == ppp::v2::Command::Local {
        // The specification tells receivers to ignore the addresses of a LOCAL connection.
        return Ok(ProxyHeader::Local);
    }
    if header.protocol == ppp::v2::Protocol::Datagram {
        return Err(AdmissionError::ProxyHeaderMalformed(
            "v2 header describes a UDP flow on a TCP listener".into(),
        ));
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Ok(ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        }),
        ppp::v2::Addresses::IPv6(a) => Ok(ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        }),
        // "the receiver must ignore the address information" for AF_UNSPEC: same as LOCAL.
        ppp::v2::Addresses::Unspecified => Ok(ProxyHeader::Local),
        ppp::v2::Addresses::Unix(_) => Err(AdmissionError::ProxyHeaderMalformed(
            "v2 header carries AF_UNIX addresses, which client.allowed_ips cannot check".into(),
        )),
    }
}

/// Fills `buf[from..to]` or reports a truncated header (the peer closed mid-header).
async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    from: usize,
    to: usize,
) -> Result<(), AdmissionError> {
    let got = read_until_full_or_eof(reader, &mut buf[from..to]).await?;
    if got < to - from {
        return Err(truncated(from + got));
    }
    Ok(())
}

/// Reads until `buf` is full or the peer closes; returns the bytes read.
async fn read_until_full_or_eof<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, AdmissionError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(AdmissionError::Io(error)),
        }
    }
    Ok(filled)
}

/// The peer closed the connection without sending anything.
fn closed_before_any_byte() -> AdmissionError {
    AdmissionError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "peer closed the connection before sending any byte",
    ))
}

/// The peer closed the connection partway through a header.
fn truncated(bytes: usize) -> AdmissionError {
    AdmissionError::ProxyHeaderMalformed(format!(
        "truncated: the connection closed after {bytes} bytes of the header"
    ))
}

/// Rate limiter for refusal logs: at most one log line per address per minute, bounded memory
/// (an attacker spraying addresses must not grow it without bound nor flood the log).
///
/// Suppressed lines lose nothing that matters: every refusal is still counted in
/// `bars_gateway_rejections_total{reason}`. When `max_tracked` addresses are all within their
/// interval, new addresses are not logged (no eviction, which would let a spray log every
/// address), and the limiter says so itself once per interval.
pub struct RefusalLogLimiter {
    interval: Duration,
    max_tracked: usize,
    state: Mutex<LimiterState>,
}

/// Addresses logged within the interval; `order` holds the same entries oldest first, so expiry is
/// amortised O(1) instead of a scan of the map under the lock on every refusal.
#[derive(Default)]
struct LimiterState {
    // std's SipHash map: keys are attacker-chosen, so a keyed hash keeps lookups O(1).
    last_logged: HashMap<IpAddr, Instant>,
    order: VecDeque<(IpAddr, Instant)>,
    overflow_warned_at: Option<Instant>,
}

impl RefusalLogLimiter {
    /// Logs each address at most once per `interval`; tracks at most `max_tracked` (min 1) of them.
    pub fn new(interval: Duration, max_tracked: usize) -> Self {
        Self {
            interval,
            max_tracked: max_tracked.max(1),
            state: Mutex::new(LimiterState::default()),
        }
    }

    /// Whether a refusal from `ip` at `now` should be logged; records it when so.
    pub fn should_log(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        let warn_overflow = {
            // A panic while the lock was held leaves state that is still fine for a log limiter.
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.expire(now, self.interval);
            if state.last_logged.contains_key(&ip) {
                return false;
            }
            if state.last_logged.len() < self.max_tracked {
                state.last_logged.insert(ip, now);
                state.order.push_back((ip, now));
                return true;
            }
            let warn = state
                .overflow_warned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
            if warn {
                state.overflow_warned_at = Some(now);
            }
            warn
        };
        // Logged outside the lock: a slow log sink must not stall other connection tasks.
        if warn_overflow {
            warn!(
                max_tracked = self.max_tracked,
                interval = ?self.interval,
                "refusals from too many addresses to log each one; new addresses are counted in metrics but not logged until older entries expire"
            );
        }
        false
    }

    /// Logs an admission refusal, at most once per interval per client address (a refusal through a
    /// balancer is keyed by the client it relayed, not the balancer).
    pub fn log_refusal(&self, peer: SocketAddr, error: &AdmissionError) {
        if let AdmissionError::LocalNotAllowed { balancer } = error {
            // Balancer health checks arrive every few seconds by design: counted, not logged.
            debug!(peer = %peer, balancer = %balancer, reason = error.reason(), "balancer health check closed at admission");
            return;
        }
        let client = error.client_ip().unwrap_or(peer.ip()).to_canonical();
        if !self.should_log(client, Instant::now()) {
            return;
        }
        let reason = error.reason();
        match error {
            // PROXY header trouble: a balancer or the config is wrong, an operator should look.
            AdmissionError::ProxyHeaderMissing
            | AdmissionError::ProxyHeaderUntrusted
            | AdmissionError::ProxyHeaderMalformed(_) => {
                warn!(
                    peer = %peer,
                    client = %client,
                    reason,
                    error = %error,
                    "connection refused at admission"
                );
            }
            // Unknown addresses, silent peers and resets are routine internet noise.
            _ => {
                info!(
                    peer = %peer,
                    client = %client,
                    reason,
                    error = %error,
                    "connection refused at admission"
                );
            }
        }
    }

    /// How many addresses are currently remembered (never more than `max_tracked`).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_logged
            .len()
    }
}

impl LimiterState {
    /// Forgets addresses whose interval has passed. `order` is sorted by time because callers pass
    /// `Instant::now()`; slight disorder between tasks only delays an expiry a little.
    fn expire(&mut self, now: Instant, interval: Duration) {
        while let Some(&(ip, at)) = self.order.front() {
            if now.saturating_duration_since(at) < interval {
                break;
            }
            self.order.pop_front();
            if self.last_logged.get(&ip) == Some(&at) {
                self.last_logged.remove(&ip);
            }
        }
    }
}

impl std::fmt::Debug for RefusalLogLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalLogLimiter")
            .field("interval", &self.interval)
            .field("max_tracked", &self.max_tracked)
            .field("tracked", &self.tracked())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncWriteExt, ReadBuf};
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
}
