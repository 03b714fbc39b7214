//! `[bars]` settings: the BaRS request rules in force. Read from TOML by `config.rs`.

/// `[bars]`: BaRS request rules.
#[derive(Debug, Clone, PartialEq)]
pub struct BarsSettings {
    /// Path prefix of the base URL registered with BaRS ("" or like "/bars/FHIR/R4").
    pub base_path: String,
    /// Strict mode (DESIGN.md §5a): NHSD-Target-Identifier required except on /metadata,
    /// Organisation and Software except on /metadata and /MessageDefinition, and every identity
    /// header shape rule enforced. Off by default (the IG: "optional for the sender").
    pub require_identity_headers: bool,
    /// Accept header major versions served.
    pub accepted_major_versions: Vec<u64>,
    /// Whether the BaRS receiver endpoints are served.
    pub bars_endpoints: bool,
    /// Extra allowed path prefixes.
    pub extra_prefixes: Vec<String>,
}
