//! The `reason` labels of `bars_gateway_rejections_total`: one enum for every level that says no
//! (admission, the connection after TLS, and the request refusals of `bars::Refusal`), so that the
//! label set is closed, listable ([`RejectionReason::ALL`], e.g. to zero-initialise the counters)
//! and documented in docs/refusals.md (a test below keeps the two equal).

/// Declares a metric label enum from one table: its variants with their label text, `ALL` (every
/// value, in order, e.g. to zero-initialise counters) and `as_str`.
macro_rules! label_enum {
    (
        $(#[doc = $enum_doc:literal])*
        $vis:vis enum $name:ident {
            $($(#[doc = $doc:literal])* $variant:ident => $label:literal,)*
        }
    ) => {
        $(#[doc = $enum_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[doc = $doc])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }
    };
}
pub(crate) use label_enum;

label_enum! {
    /// Why a connection or request was refused: the `reason` label of
    /// `bars_gateway_rejections_total`.
    pub enum RejectionReason {
        // Admission (src/admission/), before any TLS byte.
        /// The client address is not in `client.allowed_ips`.
        IpNotAllowed => "ip_not_allowed",
        /// A balancer's own health check (PROXY LOCAL / UNKNOWN) from an address not allowed.
        ProxyLocal => "proxy_local",
        /// A trusted balancer sent no PROXY header.
        ProxyHeaderMissing => "proxy_header_missing",
        /// An untrusted peer sent a PROXY header.
        ProxyHeaderUntrusted => "proxy_header_untrusted",
        /// The PROXY header is invalid.
        ProxyHeaderMalformed => "proxy_header_malformed",
        /// No PROXY header or first byte in time.
        ProxyHeaderTimeout => "proxy_header_timeout",
        /// The socket failed before the handshake.
        Io => "io",
        // The connection (src/gateway.rs).
        /// `listen.max_connections` connections are already open.
        MaxConnections => "max_connections",
        /// The handshake completed without a client certificate reaching the request layer.
        NoClientCertificate => "no_client_certificate",
        /// A request header section was not complete within `listen.header_read_timeout`.
        HeaderTimeout => "header_timeout",
        // Request refusals (src/bars/errors.rs, answered with an OperationOutcome).
        /// A required header is absent.
        MissingHeader => "missing_header",
        /// A header is malformed.
        MalformedHeader => "malformed_header",
        /// An unsafe or unsupported request target, or a broken body.
        InvalidRequest => "invalid_request",
        /// No BaRS endpoint at the path.
        NotFound => "not_found",
        /// No upstream serves the NHSD-Target-Identifier.
        UnknownTarget => "unknown_target",
        /// A known path with a wrong method.
        MethodNotAllowed => "method_not_allowed",
        /// The Accept header asks for nothing this receiver serves.
        NotAcceptable => "not_acceptable",
        /// The upstream did not answer in time.
        UpstreamTimeout => "upstream_timeout",
        /// The request body did not arrive in time.
        BodyTimeout => "body_timeout",
        /// The request header section is over `listen.max_header_bytes`.
        HeadersTooLarge => "headers_too_large",
        /// A retry of a processed request.
        Duplicate => "duplicate",
        /// The request body is over `upstream.max_body`.
        BodyTooLarge => "body_too_large",
        /// An X-Request-Id reused for different content.
        IdReused => "id_reused",
        /// A retry while the original is in flight.
        InFlight => "in_flight",
        /// A gateway bug.
        Internal => "internal",
        /// The upstream could not be reached or failed.
        UpstreamUnavailable => "upstream_unavailable",
        /// The legacy system answered with an unusable response.
        UpstreamBadResponse => "upstream_bad_response",
        /// The dedup store could not be consulted.
        StoreUnavailable => "store_unavailable",
        /// A retry of a request refused with a 4xx whose body was too large to keep.
        ReplayTooLarge => "replay_too_large",
        /// Egress: the NHS API platform refused the gateway's signed JWT.
        EgressTokenRefused => "egress_token_refused",
        /// Egress: no access token could be had.
        EgressTokenUnavailable => "egress_token_unavailable",
        /// Egress: the BaRS API gave no answer within the retry rules.
        EgressNoAnswer => "egress_no_answer",
    }
}

impl std::fmt::Display for RejectionReason {
    /// The label value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const REFUSALS_DOC: &str = include_str!("../docs/refusals.md");

    /// The labels in the first column of the table under the heading naming `rejections_total`.
    fn documented_reasons() -> Vec<String> {
        let section = REFUSALS_DOC
            .split("\n## ")
            .find(|s| {
                s.lines()
                    .next()
                    .is_some_and(|h| h.ends_with("Every `reason` of `rejections_total`"))
            })
            .expect("docs/refusals.md has the section listing every reason");
        section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split_once('`'))
            .map(|(label, _)| label.to_owned())
            .collect()
    }

    #[test]
    fn docs_list_exactly_the_rejection_reasons() {
        let documented = documented_reasons();
        let unique: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
        assert_eq!(unique.len(), documented.len(), "a reason is listed twice");
        let code: BTreeSet<&str> = RejectionReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(unique, code, "docs/refusals.md vs RejectionReason::ALL");
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let labels: BTreeSet<&str> = RejectionReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectionReason::ALL.len());
        for label in labels {
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
        }
    }
}
