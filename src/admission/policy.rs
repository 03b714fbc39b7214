//! Admission policy: the client allowlist (`client.allowed_ips`), the trusted balancers
//! (`listen.trusted_proxies`) and the decision for one accepted TCP connection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use tokio::net::TcpStream;
use tracing::debug;

use super::proxy::{
    closed_before_any_byte, read_proxy_header_within, starts_like_proxy_header, ProxyHeader,
    V2_SIGNATURE,
};
use super::AdmissionError;
use super::ClientSettings;
use crate::config::ListenSettings;

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
pub(super) fn canonical_net(net: IpNet) -> IpNet {
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

impl AdmissionPolicy {
    /// The policy `[client]` and `[listen]` describe: `client.allowed_ips`,
    /// `listen.trusted_proxies`, and `listen.header_read_timeout` as the wait for the first bytes.
    pub fn from_settings(client: &ClientSettings, listen: &ListenSettings) -> AdmissionPolicy {
        AdmissionPolicy {
            allowed_ips: IpAllowlist::new(client.allowed_ips.clone()),
            trusted_proxies: IpAllowlist::new(listen.trusted_proxies.clone()),
            proxy_header_timeout: listen.header_read_timeout,
        }
    }
}

/// A connection allowed to proceed to the TLS handshake, with the address it is on behalf of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The client (from the PROXY header, else the TCP peer), IPv4-mapped addresses canonicalised.
    pub client: SocketAddr,
    /// The trusted balancer the connection came through, if any.
    pub via_proxy: Option<IpAddr>,
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

/// The address with an IPv4-mapped IP replaced by the IPv4 one, for matching and for logs.
pub(super) fn canonical_socket_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
