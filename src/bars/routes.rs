//! Routes: refuses unsafe request targets and maps method + path to a BaRS receiver endpoint
//! (BARS-CONTEXT.md "Receiver endpoints"), giving the path the upstream is sent.
//!
//! The BaRS proxy does not restrict paths, so this is the first place an ambiguous path is seen. The
//! gateway and the legacy server must agree on what a path means, so anything two servers could
//! read differently (dot-segments, percent-encoding, backslashes, `//`, `;` path parameters,
//! control or non-ASCII bytes) is refused instead of normalised.

use std::borrow::Cow;

use http::{Method, Uri, Version};

use crate::bars::errors::Refusal;
use crate::bars::identity::IdentityRequirements;

/// A BaRS receiver endpoint, or a path under a configured extra prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /metadata`: the CapabilityStatement.
    Metadata,
    /// `GET /MessageDefinition`.
    MessageDefinition,
    /// `POST /$process-message`: bookings and referrals.
    ProcessMessage,
    /// `GET /Slot`.
    Slot,
    /// `GET|POST /Appointment`.
    Appointment,
    /// `GET|PUT|PATCH|DELETE /Appointment/{id}`.
    AppointmentInstance,
    /// `GET|POST /ServiceRequest`.
    ServiceRequest,
    /// `GET|PUT|PATCH|DELETE /ServiceRequest/{id}`.
    ServiceRequestInstance,
    /// Any method under a configured extra path prefix.
    Extra,
}

impl Endpoint {
    /// Which identity headers this endpoint requires. By default (the IG: Organisation and
    /// Software are "optional for the sender") none: NHSD-Target-Identifier is then needed only
    /// when routing by target without a default upstream, which `Upstreams::select` refuses.
    /// Strict mode (`require_identity_headers`, the spec's reading) requires Target-Identifier
    /// except on `/metadata`, and Organisation and Software except on `/metadata` and
    /// `/MessageDefinition`, where the IG says they are not expected. Extra paths are treated as
    /// write endpoints.
    pub fn identity_requirements(self, require_identity_headers: bool) -> IdentityRequirements {
        match self {
            Endpoint::Metadata => IdentityRequirements {
                target: false,
                organisation: false,
                software: false,
            },
            Endpoint::MessageDefinition => IdentityRequirements {
                target: require_identity_headers,
                organisation: false,
                software: false,
            },
            Endpoint::ProcessMessage
            | Endpoint::Slot
            | Endpoint::Appointment
            | Endpoint::AppointmentInstance
            | Endpoint::ServiceRequest
            | Endpoint::ServiceRequestInstance
            | Endpoint::Extra => IdentityRequirements {
                target: require_identity_headers,
                organisation: require_identity_headers,
                software: require_identity_headers,
            },
        }
    }

    /// A stable, low-cardinality label for logs and metrics, e.g. `process-message`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Metadata => "metadata",
            Endpoint::MessageDefinition => "message-definition",
            Endpoint::ProcessMessage => "process-message",
            Endpoint::Slot => "slot",
            Endpoint::Appointment => "appointment",
            Endpoint::AppointmentInstance => "appointment-instance",
            Endpoint::ServiceRequest => "service-request",
            Endpoint::ServiceRequestInstance => "service-request-instance",
            Endpoint::Extra => "extra",
        }
    }

    /// The methods this endpoint serves, in `Allow` order, and the `Allow` value; `None` for any.
    fn allowed(self) -> Option<(&'static [Method], &'static str)> {
        const GET: &[Method] = &[Method::GET];
        const POST: &[Method] = &[Method::POST];
        const COLLECTION: &[Method] = &[Method::GET, Method::POST];
        const INSTANCE: &[Method] = &[Method::GET, Method::PUT, Method::PATCH, Method::DELETE];
        match self {
            Endpoint::Metadata | Endpoint::MessageDefinition | Endpoint::Slot => Some((GET, "GET")),
            Endpoint::ProcessMessage => Some((POST, "POST")),
            Endpoint::Appointment | Endpoint::ServiceRequest => Some((COLLECTION, "GET, POST")),
            Endpoint::AppointmentInstance | Endpoint::ServiceRequestInstance => {
                Some((INSTANCE, "GET, PUT, PATCH, DELETE"))
            }
            Endpoint::Extra => None,
        }
    }
}

/// A resolved request: which endpoint, and the path and query to send upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The endpoint matched.
    pub endpoint: Endpoint,
    /// The path with `base_path` removed (always starting with `/`, `%24` decoded to `$`), plus
    /// `?query` exactly as received if the request had one.
    pub path_and_query: String,
}

/// The paths this receiver serves; built once at config load, consulted on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    /// `""` or like `/bars/FHIR/R4` (validated by config).
    base_path: String,
    /// Serve the BaRS receiver endpoints.
    bars_endpoints: bool,
    /// Extra prefixes without a trailing `/` (so `""` is the whole tree).
    extra_prefixes: Vec<String>,
}

impl RouteTable {
    /// Builds the table. `base_path` is the path prefix of the base URL registered with BaRS (`""`
    /// or starting with `/`, no trailing `/`), `bars_endpoints` serves the BaRS receiver endpoints,
    /// and `extra_prefixes` (like `/Patient`, matched after `base_path` is removed, on segment
    /// boundaries) allow any method. A trailing `/` on an extra prefix is ignored.
    pub fn new(base_path: &str, bars_endpoints: bool, extra_prefixes: Vec<String>) -> Self {
        let extra_prefixes = extra_prefixes
            .into_iter()
            .map(|prefix| prefix.trim_end_matches('/').to_owned())
            .collect();
        RouteTable {
            base_path: base_path.to_owned(),
            bars_endpoints,
            extra_prefixes,
        }
    }

    /// Resolves a request: `InvalidRequest` for an unsafe target, `NotFound` for a path this
    /// receiver does not serve, `MethodNotAllowed` (with `Allow`) for a known path and wrong method.
    ///
    /// BaRS endpoints are matched before extra prefixes, so an extra prefix cannot widen the
    /// methods allowed on a BaRS endpoint's exact path.
    pub fn resolve(&self, method: &Method, uri: &Uri, version: Version) -> Result<Route, Refusal> {
        let path = request_path(uri, version)?;
        check_path_is_unambiguous(path)?;
        let query = uri.query();
        if let Some(query) = query {
            check_query(query)?;
        }
        // The proxy may send `$process-message` percent-encoded; `$` is its only encoded form
        // allowed (see check_path_is_unambiguous), so decoding cannot create `/`, `.` or `%`.
        let path: Cow<'_, str> = if path.contains('%') {
            Cow::Owned(path.replace("%24", "$"))
        } else {
            Cow::Borrowed(path)
        };
        let rest = self.strip_base_path(&path).ok_or(Refusal::NotFound)?;
        let endpoint = self.match_endpoint(method, rest)?;
        let mut path_and_query =
            String::with_capacity(rest.len() + query.map_or(0, |q| q.len() + 1));
        path_and_query.push_str(rest);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Ok(Route {
            endpoint,
            path_and_query,
        })
    }

    /// The path after `base_path`, starting with `/`; `None` outside it (segment boundaries, so
    /// `/bars/FHIR/R4x` is not under `/bars/FHIR/R4`, and the bare base path is no endpoint).
    fn strip_base_path<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(self.base_path.as_str())?;
        rest.starts_with('/').then_some(rest)
    }

    fn match_endpoint(&self, method: &Method, rest: &str) -> Result<Endpoint, Refusal> {
        if self.bars_endpoints {
            if let Some(endpoint) = bars_endpoint(rest) {
                return match endpoint.allowed() {
                    Some((methods, allow)) if !methods.contains(method) => {
                        Err(Refusal::MethodNotAllowed {
                            allow: allow.to_owned(),
                        })
                    }
                    _ => Ok(endpoint),
                };
            }
        }
        let under_extra = self.extra_prefixes.iter().any(|prefix| {
            rest.strip_prefix(prefix.as_str())
                .is_some_and(|after| after.is_empty() || after.starts_with('/'))
        });
        if under_extra {
            // Only the methods of a REST API pass. CONNECT would ask a proxy-capable legacy server
            // to open a tunnel, TRACE (and IIS's TRACK) to echo the request with the gateway's
            // added headers, WebDAV's PROPFIND/MOVE/... to act on files: never a receiver's job,
            // and an extension method is exactly what a legacy server may handle in a way nobody
            // reviewed.
            if !EXTRA_METHODS.contains(method) {
                return Err(Refusal::MethodNotAllowed {
                    allow: EXTRA_ALLOW.to_owned(),
                });
            }
            Ok(Endpoint::Extra)
        } else {
            Err(Refusal::NotFound)
        }
    }
}

/// The methods forwarded under an extra prefix.
const EXTRA_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The `Allow` value for a refused method under an extra prefix: [`EXTRA_METHODS`].
const EXTRA_ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The BaRS endpoint at `path` (after the base path), if any. Case-sensitive, as BaRS says; a
/// trailing `/` matches nothing.
fn bars_endpoint(path: &str) -> Option<Endpoint> {
    let path = path.strip_prefix('/')?;
    match path.split_once('/') {
        None => match path {
            "metadata" => Some(Endpoint::Metadata),
            "MessageDefinition" => Some(Endpoint::MessageDefinition),
            "$process-message" => Some(Endpoint::ProcessMessage),
            "Slot" => Some(Endpoint::Slot),
            "Appointment" => Some(Endpoint::Appointment),
            "ServiceRequest" => Some(Endpoint::ServiceRequest),
            _ => None,
        },
        Some(("Appointment", id)) if is_fhir_id(id) => Some(Endpoint::AppointmentInstance),
        Some(("ServiceRequest", id)) if is_fhir_id(id) => Some(Endpoint::ServiceRequestInstance),
        Some(_) => None,
    }
}

/// A FHIR R4 resource id: `[A-Za-z0-9\-\.]{1,64}`, excluding the dot-segments `.` and `..`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && id != "."
        && id != ".."
}

/// The path of an origin-form target, or of the absolute form HTTP/2 always gives (from
/// `:scheme` and `:authority`); the authority-form (`CONNECT host:port`) and asterisk-form
/// (`OPTIONS *`) name no resource here.
fn request_path(uri: &Uri, version: Version) -> Result<&str, Refusal> {
    let path = uri.path();
    if path == "*" {
        return Err(invalid("The asterisk-form request target is not allowed"));
    }
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(invalid("The authority-form request target is not allowed"));
    }
    // HTTP/1.x clients send the absolute form only to forward proxies (RFC 9112 §3.2.2) and the
    // BaRS proxy never does. This is no forward proxy, so a target naming a host is refused rather
    // than served as if the host did not matter.
    if uri.scheme().is_some() && version < Version::HTTP_2 {
        return Err(invalid("The absolute-form request target is not allowed"));
    }
    if !path.starts_with('/') {
        return Err(invalid("The request path must start with '/'"));
    }
    Ok(path)
}

/// Refuses paths that the gateway and the legacy server (or a server's framework) could read
/// differently, so a path that passes here means the same thing upstream.
fn check_path_is_unambiguous(path: &str) -> Result<(), Refusal> {
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            // Only `%24` (`$`, for `/$process-message`): any other escape could hide `/`, `.`, `\`
            // or a NUL from this check and be decoded upstream.
            b'%' if bytes.get(i + 1..i + 3) != Some(b"24".as_slice()) => {
                return Err(invalid(
                    "Percent-encoding other than %24 is not allowed in the path",
                ));
            }
            // IIS and others treat `\` as `/`.
            b'\\' => return Err(invalid("A backslash is not allowed in the path")),
            // Tomcat and Jetty strip `;` path parameters, so `/x/..;/y` reaches them as `/y`.
            b';' => return Err(invalid("Path parameters (';') are not allowed in the path")),
            0x00..=0x1f | 0x7f => {
                return Err(invalid("Control characters are not allowed in the path"));
            }
            0x80..=0xff => return Err(invalid("Non-ASCII bytes are not allowed in the path")),
            _ => {}
        }
    }
    // `path` starts with '/' (request_path); a trailing empty segment is a trailing slash, which
    // is unambiguous and simply matches no endpoint.
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" if segments.peek().is_some() => {
                return Err(invalid("Empty path segments ('//') are not allowed"));
            }
            "." | ".." => return Err(invalid("Dot-segments are not allowed in the path")),
            _ => {}
        }
    }
    Ok(())
}

/// The query is passed through unchanged, so only bytes that could split or truncate it are refused
/// (a `#` would start a fragment upstream; control bytes could end the request line).
fn check_query(query: &str) -> Result<(), Refusal> {
    for b in query.bytes() {
        match b {
            b'#' => return Err(invalid("A '#' is not allowed in the query")),
            0x00..=0x1f | 0x7f => {
                return Err(invalid("Control characters are not allowed in the query"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn invalid(reason: &str) -> Refusal {
    Refusal::InvalidRequest(reason.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: [Method; 7] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ];

    fn bars() -> RouteTable {
        RouteTable::new("", true, Vec::new())
    }

    fn uri(text: &str) -> Uri {
        text.parse().unwrap()
    }

    fn resolve(table: &RouteTable, method: Method, target: &str) -> Result<Route, Refusal> {
        table.resolve(&method, &uri(target), Version::HTTP_11)
    }

    fn resolve_h2(table: &RouteTable, method: Method, target: &str) -> Result<Route, Refusal> {
        table.resolve(&method, &uri(target), Version::HTTP_2)
    }

    fn assert_invalid(result: Result<Route, Refusal>, reason: &str) {
        let refusal = result.expect_err("should be refused");
        assert!(matches!(refusal, Refusal::InvalidRequest(_)), "{refusal:?}");
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.issue_code(), "invalid");
        assert!(refusal.to_string().contains(reason), "{refusal}");
    }

    fn assert_not_found(result: Result<Route, Refusal>) {
        let refusal = result.expect_err("should be 404");
        assert_eq!(refusal, Refusal::NotFound);
        assert_eq!(refusal.status(), 404);
        assert_eq!(refusal.issue_code(), "not-found");
    }

    #[test]
    fn every_endpoint_serves_its_methods_and_refuses_others_with_allow() {
        let table: [(&str, Endpoint, &str); 8] = [
            ("/metadata", Endpoint::Metadata, "GET"),
            ("/MessageDefinition", Endpoint::MessageDefinition, "GET"),
            ("/$process-message", Endpoint::ProcessMessage, "POST"),
            ("/Slot", Endpoint::Slot, "GET"),
            ("/Appointment", Endpoint::Appointment, "GET, POST"),
            (
                "/Appointment/4c9c6f5e-3a6a-4d4b-9d59-1c2d3e4f5a6b",
                Endpoint::AppointmentInstance,
                "GET, PUT, PATCH, DELETE",
            ),
            ("/ServiceRequest", Endpoint::ServiceRequest, "GET, POST"),
            (
                "/ServiceRequest/sr.1-A",
                Endpoint::ServiceRequestInstance,
                "GET, PUT, PATCH, DELETE",
            ),
        ];
        for (path, endpoint, allow) in table {
            for method in METHODS {
                let result = resolve(&bars(), method.clone(), path);
                if allow.split(", ").any(|m| m == method.as_str()) {
                    let route = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                    assert_eq!(route.endpoint, endpoint);
                    assert_eq!(route.path_and_query, path);
                } else {
                    let refusal = result.expect_err("should be 405");
                    assert_eq!(
                        refusal,
                        Refusal::MethodNotAllowed {
                            allow: allow.into()
                        },
                        "{method} {path}"
                    );
                    assert_eq!(refusal.status(), 405);
                    assert_eq!(refusal.issue_code(), "not-supported");
                    assert_eq!(refusal.allow(), Some(allow));
                }
            }
        }
    }

    #[test]
    fn process_message_answers_get_with_allow_post() {
        let refusal = resolve(&bars(), Method::GET, "/$process-message").unwrap_err();
        assert_eq!(refusal.allow(), Some("POST"));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in [
            "/",
            "/Metadata",
            "/METADATA",
            "/metadata/",
            "/metadata/x",
            "/process-message",
            "/$Process-Message",
            "/Slot/1",
            "/Slots",
            "/Appointment/",
            "/Appointment/a/b",
            "/Appointment/has_underscore",
            "/Appointment/$process-message",
            "/ServiceRequest/1/_history/2",
            "/Patient",
            "/appointment",
        ] {
            assert_not_found(resolve(&bars(), Method::GET, path));
        }
    }

    #[test]
    fn fhir_id_length_and_characters_are_checked() {
        let longest = format!("/Appointment/{}", "a".repeat(64));
        assert!(resolve(&bars(), Method::GET, &longest).is_ok());
        let too_long = format!("/Appointment/{}", "a".repeat(65));
        assert_not_found(resolve(&bars(), Method::GET, &too_long));
        assert!(resolve(&bars(), Method::DELETE, "/ServiceRequest/A-z.0").is_ok());
        assert!(resolve(&bars(), Method::GET, "/Appointment/...").is_ok());
        assert_not_found(resolve(&bars(), Method::GET, "/Appointment/a+b"));
        assert_not_found(resolve(&bars(), Method::GET, "/Appointment/a~b"));
    }

    #[test]
    fn percent_24_is_decoded_to_dollar() {
        let route = resolve(&bars(), Method::POST, "/%24process-message").unwrap();
        assert_eq!(route.endpoint, Endpoint::ProcessMessage);
        assert_eq!(route.path_and_query, "/$process-message");
        let route = resolve(&bars(), Method::POST, "/bars/%24process-message?a=%24");
        assert_not_found(route);
        let table = RouteTable::new("/bars", true, Vec::new());
        let route = resolve(&table, Method::POST, "/bars/%24process-message?a=%24").unwrap();
        assert_eq!(route.path_and_query, "/$process-message?a=%24");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let cases = [
            ("/./metadata", "Dot-segments"),
            ("/a/../metadata", "Dot-segments"),
            ("/metadata/.", "Dot-segments"),
            ("/metadata/..", "Dot-segments"),
            ("/..", "Dot-segments"),
            ("/Appointment/..", "Dot-segments"),
            ("/%2e%2e/metadata", "Percent-encoding"),
            ("/metadata%2F", "Percent-encoding"),
            ("/%2524process-message", "Percent-encoding"),
            ("/%4dessageDefinition", "Percent-encoding"),
            ("/%", "Percent-encoding"),
            ("/%2", "Percent-encoding"),
            ("/metadata%00", "Percent-encoding"),
            ("/a\\..\\metadata", "backslash"),
            ("//metadata", "Empty path segments"),
            ("/Appointment//1", "Empty path segments"),
            ("/metadata//", "Empty path segments"),
            ("/Patient/..;/admin", "Path parameters"),
            ("/metadata;jsessionid=1", "Path parameters"),
        ];
        for (path, reason) in cases {
            assert_invalid(resolve(&bars(), Method::GET, path), reason);
        }
    }

    #[test]
    fn control_and_non_ascii_bytes_in_the_path_are_refused() {
        // `Uri` parsing rejects most of these already; build from parts where it lets them through.
        for path in ["/metad\u{e9}ta", "/Appointment/\u{1F600}"] {
            if let Ok(uri) = path.parse::<Uri>() {
                assert_invalid(
                    bars().resolve(&Method::GET, &uri, Version::HTTP_11),
                    "Non-ASCII",
                );
            }
        }
        assert_invalid(
            check_path_is_unambiguous("/meta\x01data").map(|()| route()),
            "Control",
        );
        assert_invalid(
            check_path_is_unambiguous("/meta\x7fdata").map(|()| route()),
            "Control",
        );
        assert_invalid(
            check_path_is_unambiguous("/metad\u{e9}ta").map(|()| route()),
            "Non-ASCII",
        );
    }

    fn route() -> Route {
        Route {
            endpoint: Endpoint::Metadata,
            path_and_query: String::new(),
        }
    }

    #[test]
    fn unsafe_queries_are_refused() {
        assert_invalid(check_query("a=1#frag").map(|()| route()), "'#'");
        assert_invalid(check_query("a=\x00").map(|()| route()), "Control");
        assert_invalid(check_query("a=\x7f").map(|()| route()), "Control");
        // `Uri` drops a fragment itself, so none reaches the upstream that way either.
        let route = resolve(&bars(), Method::GET, "/metadata?a=1#frag").unwrap();
        assert_eq!(route.path_and_query, "/metadata?a=1");
    }

    #[test]
    fn asterisk_and_authority_form_targets_are_refused() {
        assert_invalid(resolve(&bars(), Method::OPTIONS, "*"), "asterisk-form");
        assert_invalid(
            resolve(&bars(), Method::CONNECT, "example.nhs.uk:443"),
            "authority-form",
        );
    }

    #[test]
    fn http2_absolute_form_targets_use_their_path() {
        let route = resolve_h2(
            &bars(),
            Method::POST,
            "https://bars.example.nhs.uk/$process-message?x=1",
        )
        .unwrap();
        assert_eq!(route.endpoint, Endpoint::ProcessMessage);
        assert_eq!(route.path_and_query, "/$process-message?x=1");
        assert_not_found(resolve_h2(
            &bars(),
            Method::GET,
            "https://bars.example.nhs.uk",
        ));
        let table = RouteTable::new("/bars/FHIR/R4", true, Vec::new());
        let route = resolve_h2(
            &table,
            Method::GET,
            "http://host:8443/bars/FHIR/R4/metadata",
        )
        .unwrap();
        assert_eq!(route.path_and_query, "/metadata");
    }

    #[test]
    fn http1_absolute_form_targets_are_refused() {
        for target in [
            "http://evil.example/metadata",
            "https://localhost/metadata",
            "http://host:8443/bars/FHIR/R4/metadata",
        ] {
            for version in [Version::HTTP_10, Version::HTTP_11] {
                let result = bars().resolve(&Method::GET, &uri(target), version);
                assert_invalid(result, "absolute-form");
            }
        }
    }

    #[test]
    fn only_rest_methods_pass_under_an_extra_prefix() {
        let table = RouteTable::new("", false, vec!["/Patient".into()]);
        for method in [
            "CONNECT", "TRACE", "TRACK", "PROPFIND", "MOVE", "MKCOL", "LOCK", "FOO",
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let refusal = resolve(&table, method.clone(), "/Patient/1").unwrap_err();
            assert_eq!(refusal.status(), 405, "{method}");
            assert_eq!(refusal.allow(), Some(EXTRA_ALLOW));
        }
        for method in &EXTRA_METHODS {
            assert!(
                resolve(&table, method.clone(), "/Patient/1").is_ok(),
                "{method}"
            );
            assert!(EXTRA_ALLOW.contains(method.as_str()), "{method}");
        }
    }

    #[test]
    fn queries_are_passed_through_unchanged() {
        let route = resolve(
            &bars(),
            Method::GET,
            "/MessageDefinition?context=booking-request&x=%2F%20y",
        )
        .unwrap();
        assert_eq!(
            route.path_and_query,
            "/MessageDefinition?context=booking-request&x=%2F%20y"
        );
        let route = resolve(&bars(), Method::GET, "/Slot?").unwrap();
        assert_eq!(route.path_and_query, "/Slot?");
        let route = resolve(&bars(), Method::GET, "/Slot").unwrap();
        assert_eq!(route.path_and_query, "/Slot");
    }

    #[test]
    fn base_path_is_required_and_removed() {
        let table = RouteTable::new("/bars/FHIR/R4", true, vec!["/Patient".into()]);
        let route = resolve(&table, Method::GET, "/bars/FHIR/R4/metadata").unwrap();
        assert_eq!(route.endpoint, Endpoint::Metadata);
        assert_eq!(route.path_and_query, "/metadata");
        let route = resolve(
            &table,
            Method::GET,
            "/bars/FHIR/R4/Appointment/1?_format=json",
        )
        .unwrap();
        assert_eq!(route.path_and_query, "/Appointment/1?_format=json");
        let route = resolve(&table, Method::GET, "/bars/FHIR/R4/Patient/9").unwrap();
        assert_eq!(
            (route.endpoint, route.path_and_query.as_str()),
            (Endpoint::Extra, "/Patient/9")
        );
        for outside in [
            "/metadata",
            "/bars/FHIR/R4",
            "/bars/FHIR/R4/",
            "/bars/FHIR/R4x/metadata",
            "/bars/fhir/r4/metadata",
            "/bars/FHIR/metadata",
            "/Patient",
        ] {
            assert_not_found(resolve(&table, Method::GET, outside));
        }
        // Wrong method under the base path is still a 405, not a 404.
        let refusal = resolve(&table, Method::GET, "/bars/FHIR/R4/$process-message").unwrap_err();
        assert_eq!(refusal.allow(), Some("POST"));
        // Safety checks apply to the whole path, base path included.
        assert_invalid(
            resolve(&table, Method::GET, "/bars/FHIR/R4/../R4/metadata"),
            "Dot-segments",
        );
        assert_invalid(
            resolve(&table, Method::GET, "/bars//FHIR/R4/metadata"),
            "Empty path segments",
        );
    }

    #[test]
    fn extra_prefixes_allow_any_method_on_segment_boundaries() {
        let table = RouteTable::new("", false, vec!["/Patient".into(), "/Organization/".into()]);
        for method in METHODS {
            for path in [
                "/Patient",
                "/Patient/9",
                "/Patient/9/_history/1",
                "/Patient/",
                "/Organization/A1?x=1",
            ] {
                let route = resolve(&table, method.clone(), path)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                assert_eq!(route.endpoint, Endpoint::Extra);
                assert_eq!(route.path_and_query, path);
            }
        }
        for path in [
            "/Patients",
            "/patient",
            "/PatientX/1",
            "/metadata",
            "/$process-message",
            "/Organizations",
        ] {
            assert_not_found(resolve(&table, Method::GET, path));
        }
    }

    #[test]
    fn bars_endpoints_win_over_an_overlapping_extra_prefix() {
        let table = RouteTable::new("", true, vec!["/Appointment".into()]);
        let refusal = resolve(&table, Method::PUT, "/Appointment").unwrap_err();
        assert_eq!(refusal.allow(), Some("GET, POST"));
        let route = resolve(&table, Method::PUT, "/Appointment/1/extra").unwrap();
        assert_eq!(route.endpoint, Endpoint::Extra);
    }

    #[test]
    fn bars_endpoints_can_be_turned_off() {
        let table = RouteTable::new("", false, Vec::new());
        assert_not_found(resolve(&table, Method::GET, "/metadata"));
    }

    #[test]
    fn identity_requirements_follow_the_ig() {
        let none = IdentityRequirements {
            target: false,
            organisation: false,
            software: false,
        };
        let target_only = IdentityRequirements {
            target: true,
            organisation: false,
            software: false,
        };
        let all = IdentityRequirements {
            target: true,
            organisation: true,
            software: true,
        };
        for flag in [true, false] {
            assert_eq!(Endpoint::Metadata.identity_requirements(flag), none);
        }
        assert_eq!(
            Endpoint::MessageDefinition.identity_requirements(true),
            target_only
        );
        assert_eq!(
            Endpoint::MessageDefinition.identity_requirements(false),
            none
        );
        for endpoint in [
            Endpoint::ProcessMessage,
            Endpoint::Slot,
            Endpoint::Appointment,
            Endpoint::AppointmentInstance,
            Endpoint::ServiceRequest,
            Endpoint::ServiceRequestInstance,
            Endpoint::Extra,
        ] {
            assert_eq!(endpoint.identity_requirements(true), all, "{endpoint:?}");
            assert_eq!(endpoint.identity_requirements(false), none, "{endpoint:?}");
        }
    }

    #[test]
    fn endpoint_names_are_distinct_labels() {
        let names = [
            Endpoint::Metadata,
            Endpoint::MessageDefinition,
            Endpoint::ProcessMessage,
            Endpoint::Slot,
            Endpoint::Appointment,
            Endpoint::AppointmentInstance,
            Endpoint::ServiceRequest,
            Endpoint::ServiceRequestInstance,
            Endpoint::Extra,
        ]
        .map(Endpoint::name);
        assert_eq!(names[0], "metadata");
        assert_eq!(names[2], "process-message");
        let mut unique = names.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }
}
