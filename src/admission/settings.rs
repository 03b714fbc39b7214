//! `[client]` settings: who may connect (the environment's presets, the allowed addresses and
//! certificate subjects, the pins). Read from TOML by `config.rs`; the addresses are admission's,
//! the subjects and pins the TLS client verifier's (`tls/policy.rs`).

use ipnet::IpNet;
use serde::Deserialize;

use crate::tls::Pin;

/// The BaRS API proxy's source addresses in INT (BaRS IG, Deploy: firewall exceptions).
pub const INT_PROXY_IPS: [&str; 2] = ["35.197.254.55/32", "35.246.55.143/32"];

/// The BaRS API proxy's source addresses in PROD.
pub const PROD_PROXY_IPS: [&str; 2] = ["34.89.0.111/32", "34.89.69.6/32"];

/// The CN of the client certificate the BaRS proxy presents in INT.
pub const INT_PROXY_SUBJECT: &str = "int.api.service.nhs.uk";

/// The CN of the client certificate the BaRS proxy presents in PROD.
pub const PROD_PROXY_SUBJECT: &str = "bars-proxy.spineservices.nhs.uk";

/// Which BaRS environment's presets apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Path to Live integration: the INT proxy addresses and CN.
    Int,
    /// Production: the PROD proxy addresses and CN.
    Prod,
    /// No presets: `allowed_ips` and `allowed_subjects` must be given.
    Custom,
}

/// `[client]`: who may connect.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The preset in force.
    pub environment: Environment,
    /// Source addresses allowed (after PROXY protocol, if any).
    pub allowed_ips: Vec<IpNet>,
    /// Allowed client certificate CNs or DNS SANs, lower-cased.
    pub allowed_subjects: Vec<String>,
    /// Allowed client leaf fingerprints; empty = no pinning.
    pub pinned_fingerprints: Vec<Pin>,
}
