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
//!
//! Files: `policy.rs` decides (the allowlist, trusted balancers, [`admit_peer`]); `proxy.rs` reads
//! the PROXY v1/v2 header (framing here, parsing by `ppp`); `limiter.rs` bounds the refusal log.

use std::net::IpAddr;

use crate::rejection::RejectionReason;

mod limiter;
mod policy;
mod proxy;
mod settings;
#[cfg(test)]
mod tests;

pub use limiter::RefusalLogLimiter;
pub use policy::{admit_peer, parse_cidr, AdmissionPolicy, Admitted, IpAllowlist};
pub use proxy::{read_proxy_header, ProxyHeader, V2_MAX_PAYLOAD};
pub use settings::{
    ClientSettings, Environment, INT_PROXY_IPS, INT_PROXY_SUBJECT, PROD_PROXY_IPS,
    PROD_PROXY_SUBJECT,
};

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
