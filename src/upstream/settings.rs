//! `[upstream]` settings: where clean requests go and the limits of forwarding. Read from TOML by
//! `config.rs`.

use std::time::Duration;

use http::header::HeaderName;
use http::Uri;

use crate::bars::identity::TargetIdentifier;

/// One upstream (legacy receiver) base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The URL as configured.
    pub uri: Uri,
    /// `host:port` for connecting and for the `Host` header.
    pub authority: String,
    /// The base path, without a trailing slash ("" for the root).
    pub base_path: String,
}

/// `[upstream]`: where clean requests go.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// The default legacy receiver; `None` when only routes serve.
    pub url: Option<UpstreamUrl>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// The sender's whole wait, from the request head to the response head (the BaRS 5 s limit by
    /// default): past it the sender gets 408 REC_TIMEOUT.
    pub request_timeout: Duration,
    /// How long a deduplicated request's exchange with the legacy system goes on after the sender
    /// was answered 408, so that its late answer is still recorded (DESIGN.md §5).
    pub completion_timeout: Duration,
    /// Largest response header section accepted from the legacy system.
    pub max_response_header_bytes: usize,
    /// Largest request body forwarded.
    pub max_body: u64,
    /// Request headers never forwarded.
    pub strip_headers: Vec<HeaderName>,
    /// Routes by NHSD-Target-Identifier.
    pub routes: Vec<(TargetIdentifier, UpstreamUrl)>,
}
