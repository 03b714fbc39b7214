//! What the real BaRS proxy forwards is accepted (issue 14), over real TLS-MA: the minimal header
//! set of NHS's own INT tests on every endpoint, the identity header forms the proxy routes, the
//! IG's pre-release Accept versions, ids checked before anything else, and the gateway's own
//! answers in the caller's format (FHIR XML when preferred), with XML bodies passed through byte
//! for byte on the deduplicated path.
//!
//! Every refusal asserts the status, the BaRS code, the ids echoed as sent and that the stub legacy
//! system was not called; every forward asserts that it was, once.

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::Full;

type Req = Request<Full<Bytes>>;

const TARGET: &str = "nhsd-target-identifier";
const ORGANISATION: &str = "nhsd-end-user-organisation";
const DOS_SYSTEM: &str = "https://fhir.nhs.uk/Id/dos-service-id";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// The referral from NHS 111 to an emergency department, in FHIR XML (tests/fixtures/bars-examples/README.md).
const REFERRAL_XML: &[u8] = include_bytes!("fixtures/bars-examples/referral-request-111-to-ed.xml");

fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

/// A request with exactly the header set of NHS's INT tests of the proxy
/// (`tests/test_process_message.py`): the two ids, NHSD-Target-Identifier
/// `{"value": "NHS0001", "system": "tests"}` and NHSD-Token. Nothing else.
fn int_test_request(method: &str, path: &str) -> Req {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("x-request-id", uuid::Uuid::new_v4().to_string())
        .header("x-correlation-id", uuid::Uuid::new_v4().to_string())
        .header(TARGET, b64(r#"{"value": "NHS0001", "system": "tests"}"#))
        .header("nhsd-token", "int-test-token")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A full example request (every header of the example set) for `method path`.
fn example_request(method: &str, path: &str) -> Req {
    bars_request(method, path, Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn set(mut req: Req, name: &'static str, value: impl AsRef<str>) -> Req {
    req.headers_mut()
        .insert(name, HeaderValue::from_str(value.as_ref()).unwrap());
    req
}

fn without(mut req: Req, name: &'static str) -> Req {
    req.headers_mut().remove(name);
    req
}

/// Both ids echoed byte for byte when sent, absent when not.
fn assert_ids_echoed(sent: &http::HeaderMap, reply: &Reply2) {
    for name in ["x-request-id", "x-correlation-id"] {
        assert_eq!(
            reply.headers.get(name),
            sent.get(name),
            "{name} must be echoed as sent"
        );
    }
}

/// Sends `req`, which must be forwarded once and answered 200; returns what the upstream saw.
async fn forwarded(rig: &Rig, req: Req) -> Seen {
    let sent = req.headers().clone();
    let before = rig.upstream.count();
    let reply = rig.send(req).await;
    assert_eq!(
        reply.status,
        200,
        "expected a forward; body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_ids_echoed(&sent, &reply);
    assert_eq!(
        rig.upstream.count(),
        before + 1,
        "exactly one upstream call"
    );
    rig.upstream.seen().pop().unwrap()
}

/// Sends `req`, which must be refused with a JSON OperationOutcome `status code/issue`, without
/// calling the upstream.
async fn refused(rig: &Rig, req: Req, status: u16, code: &str, issue: &str) -> Reply2 {
    let sent = req.headers().clone();
    let before = rig.upstream.count();
    let reply = rig.send(req).await;
    reply.assert_outcome(status, code, issue);
    assert_ids_echoed(&sent, &reply);
    assert_eq!(
        rig.upstream.count(),
        before,
        "the upstream must not be called"
    );
    reply
}

/// Every BaRS receiver endpoint and method, with a path the route table accepts.
const ENDPOINTS: [(&str, &str); 15] = [
    ("GET", "/metadata"),
    ("GET", "/MessageDefinition?context=booking-request"),
    ("POST", "/$process-message"),
    ("GET", "/Slot?status=free"),
    ("GET", "/Appointment?patient=9434765919"),
    ("POST", "/Appointment"),
    ("GET", "/Appointment/6a2b4c06-5d0c-4e8a-9a1d-3a7a2d4c1e01"),
    ("PUT", "/Appointment/6a2b4c06-5d0c-4e8a-9a1d-3a7a2d4c1e01"),
    ("PATCH", "/Appointment/6a2b4c06-5d0c-4e8a-9a1d-3a7a2d4c1e01"),
    (
        "DELETE",
        "/Appointment/6a2b4c06-5d0c-4e8a-9a1d-3a7a2d4c1e01",
    ),
    ("GET", "/ServiceRequest?patient=9434765919"),
    ("POST", "/ServiceRequest"),
    (
        "GET",
        "/ServiceRequest/0b8a3c1e-2f44-4a55-8d3e-6e1f2a9b7c02",
    ),
    (
        "PUT",
        "/ServiceRequest/0b8a3c1e-2f44-4a55-8d3e-6e1f2a9b7c02",
    ),
    (
        "DELETE",
        "/ServiceRequest/0b8a3c1e-2f44-4a55-8d3e-6e1f2a9b7c02",
    ),
];

// ---- defaults follow the IG -----------------------------------------------------------------

#[tokio::test]
async fn the_nhs_int_test_header_set_is_forwarded_on_every_bars_endpoint() {
    let rig = Rig::start().await;
    for (method, path) in ENDPOINTS {
        let seen = forwarded(&rig, int_test_request(method, path)).await;
        assert_eq!(seen.method.as_str(), method);
        assert_eq!(seen.uri.path_and_query().unwrap().as_str(), path);
        assert_eq!(seen.headers["x-bars-target"], "tests|NHS0001", "{path}");
        assert!(seen.headers.get("x-bars-ods-code").is_none(), "{path}");
        assert_eq!(seen.headers["nhsd-token"], "int-test-token");
    }
    // The ids alone are enough where nothing is routed by target.
    let seen = forwarded(
        &rig,
        without(int_test_request("POST", "/$process-message"), TARGET),
    )
    .await;
    assert!(seen.headers.get("x-bars-target").is_none());
    assert_eq!(rig.upstream.count(), ENDPOINTS.len() + 1);
}

#[tokio::test]
async fn strict_mode_requires_organisation_and_software_as_before() {
    let rig = Rig::start_with(|s| s.bars.require_identity_headers = true).await;
    let reply = refused(
        &rig,
        int_test_request("POST", "/$process-message"),
        400,
        "REC_BAD_REQUEST",
        "invalid",
    )
    .await;
    assert_eq!(
        reply.diagnostics(),
        "NHSD-End-User-Organisation header is missing"
    );
    let reply = refused(
        &rig,
        without(int_test_request("GET", "/MessageDefinition"), TARGET),
        400,
        "REC_BAD_REQUEST",
        "invalid",
    )
    .await;
    assert_eq!(
        reply.diagnostics(),
        "NHSD-Target-Identifier header is missing"
    );
    // /metadata needs none of them, in either mode.
    forwarded(&rig, without(int_test_request("GET", "/metadata"), TARGET)).await;
}

#[tokio::test]
async fn routing_by_target_needs_a_readable_target() {
    let pki = TestPki::new();
    let default = TestUpstream::start().await;
    let routed = TestUpstream::start().await;
    let text = format!(
        "{}\n[[upstream.route]]\ntarget = \"{DOS_SYSTEM}|2000011147\"\nurl = \"{}\"\n",
        pki.config_toml(&default.url()),
        routed.url()
    );
    let gateway = TestGateway::start(pki.settings(&text)).await;
    let rig = Rig {
        pki,
        upstream: default,
        gateway,
    };
    // A numeric value routes, as at the proxy.
    let req = set(
        example_request("POST", "/$process-message"),
        TARGET,
        b64(&format!(
            r#"{{"system":"{DOS_SYSTEM}","value":2000011147}}"#
        )),
    );
    let reply = rig.send(req).await;
    assert_eq!(reply.status, 200);
    assert_eq!(routed.count(), 1);
    assert_eq!(
        routed.only().headers["x-bars-target"],
        format!("{DOS_SYSTEM}|2000011147")
    );
    // A target the gateway cannot read is refused here: it decides where the request goes.
    let req = set(
        example_request("POST", "/$process-message"),
        TARGET,
        b64(&format!(r#"{{"system":"{DOS_SYSTEM}"}}"#)),
    );
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
    assert_eq!(
        reply.diagnostics(),
        "NHSD-Target-Identifier header is malformed: value must be a non-empty string"
    );
    assert_eq!(routed.count(), 1);
}

// ---- lenient where the proxy is lenient ----------------------------------------------------

/// (case, header, decoded JSON, X-BaRS-Target expected, X-BaRS-Ods-Code expected, warning
/// `problem` label expected, strict-mode problem)
type Form = (
    &'static str,
    &'static str,
    String,
    Option<String>,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

fn lenient_forms() -> Vec<Form> {
    let example_target = Some(format!("{DOS_SYSTEM}|2000011147"));
    vec![
        (
            "numeric target value",
            TARGET,
            format!(r#"{{"system":"{DOS_SYSTEM}","value":2000011147}}"#),
            example_target.clone(),
            Some("A1001"),
            None,
            "value must be a non-empty string",
        ),
        (
            "organisation without resourceType",
            ORGANISATION,
            format!(r#"{{"identifier":[{{"system":"{ODS_SYSTEM}","value":"RX1"}}],"name":"X"}}"#),
            example_target.clone(),
            Some("RX1"),
            None,
            r#"resourceType must be "Organization""#,
        ),
        (
            "organisation identifier as an object",
            ORGANISATION,
            format!(
                r#"{{"resourceType":"Organization","identifier":{{"system":"{ODS_SYSTEM}","value":"RX1"}}}}"#
            ),
            example_target.clone(),
            Some("RX1"),
            None,
            "identifier must be an array",
        ),
        (
            "ODS system spelt with http://",
            ORGANISATION,
            r#"{"resourceType":"Organization","identifier":[{"system":"http://fhir.nhs.uk/Id/ods-organization-code","value":"RX1"}]}"#.into(),
            example_target.clone(),
            Some("RX1"),
            None,
            "identifier has no ODS organisation code",
        ),
        (
            "ODS system spelt organisation",
            ORGANISATION,
            r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organisation-code","value":"RX1"}]}"#.into(),
            example_target.clone(),
            Some("RX1"),
            None,
            "identifier has no ODS organisation code",
        ),
        (
            "organisation with no ODS code at all",
            ORGANISATION,
            r#"{"resourceType":"Organization","identifier":[{"system":"https://other.example/Id","value":"RX1"}]}"#.into(),
            example_target.clone(),
            None,
            Some("no_ods_code"),
            "identifier has no ODS organisation code",
        ),
        (
            "target without a system",
            TARGET,
            r#"{"value":"2000011147"}"#.into(),
            None,
            Some("A1001"),
            Some("no_system"),
            "system must be a non-empty string",
        ),
    ]
}

#[tokio::test]
async fn lenient_forms_are_forwarded_untouched_with_the_x_bars_headers_they_give() {
    let rig = Rig::start().await;
    let mut warnings = 0;
    for (case, header, json, target, ods, warning, _) in lenient_forms() {
        let value = b64(&json);
        let req = set(example_request("POST", "/$process-message"), header, &value);
        let seen = forwarded(&rig, req).await;
        assert_eq!(
            seen.headers[header],
            value.as_str(),
            "{case}: forwarded untouched"
        );
        assert_eq!(
            seen.headers
                .get("x-bars-target")
                .map(|v| v.to_str().unwrap().to_owned()),
            target,
            "{case}"
        );
        assert_eq!(
            seen.headers
                .get("x-bars-ods-code")
                .map(|v| v.to_str().unwrap()),
            ods,
            "{case}"
        );
        warnings += usize::from(warning.is_some());
    }
    assert_eq!(warnings, 2);
    let metrics = admin_get(rig.gateway.admin.unwrap(), "/metrics").await;
    for expected in [
        r#"bars_gateway_identity_header_warnings_total{header="NHSD-End-User-Organisation",problem="no_ods_code"} 1"#,
        r#"bars_gateway_identity_header_warnings_total{header="NHSD-Target-Identifier",problem="no_system"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"bars_gateway_rejections_total{reason="malformed_header"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn strict_mode_still_refuses_the_lenient_forms() {
    let rig = Rig::start_with(|s| s.bars.require_identity_headers = true).await;
    for (case, header, json, _, _, _, problem) in lenient_forms() {
        let req = set(
            example_request("POST", "/$process-message"),
            header,
            b64(&json),
        );
        let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
        let diagnostics = reply.diagnostics();
        assert!(
            diagnostics.ends_with(problem) || diagnostics.contains(problem),
            "{case}: {diagnostics}"
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

// ---- Accept ---------------------------------------------------------------------------------

#[tokio::test]
async fn pre_release_accept_versions_are_served_by_major() {
    let rig = Rig::start().await;
    for accept in [
        "application/fhir+json; version=1.4.0-alpha",
        "application/fhir+json; version=1.2.0-beta.1",
        "application/fhir+xml; version=1.0.0-rc1",
    ] {
        let seen = forwarded(
            &rig,
            set(
                example_request("POST", "/$process-message"),
                "accept",
                accept,
            ),
        )
        .await;
        assert_eq!(seen.headers["accept"], accept);
    }
    for accept in [
        "application/fhir+json; version=2.0.0-alpha",
        "application/fhir+json; version=one",
        "application/fhir+json; version=1.4.0-",
    ] {
        let req = set(
            example_request("POST", "/$process-message"),
            "accept",
            accept,
        );
        let reply = refused(&rig, req, 406, "REC_NOT_ACCEPTABLE", "processing").await;
        assert_eq!(
            reply.diagnostics(),
            "Accept asks for an unsupported version; supported major versions: 1",
            "{accept}"
        );
    }
}

// ---- ids first, without exception ----------------------------------------------------------

#[tokio::test]
async fn requests_without_valid_ids_get_400_before_404_405_and_431() {
    let rig = Rig::start().await;
    let huge = "x".repeat(40 * 1024);
    let cases: Vec<(Req, &str, &str)> = vec![
        (
            without(int_test_request("GET", "/Patient"), "x-request-id"),
            "invalid",
            "X-Request-Id header is missing",
        ),
        (
            without(
                int_test_request("GET", "/$process-message"),
                "x-correlation-id",
            ),
            "invalid",
            "X-Correlation-Id header is missing",
        ),
        (
            set(
                int_test_request("GET", "/a/../metadata"),
                "x-request-id",
                "not-a-uuid",
            ),
            "value",
            "X-Request-Id header is malformed: is not a UUID (8-4-4-4-12 hexadecimal digits)",
        ),
        (
            set(
                without(
                    int_test_request("POST", "/$process-message"),
                    "x-request-id",
                ),
                "x-padding",
                &huge,
            ),
            "invalid",
            "X-Request-Id header is missing",
        ),
    ];
    for (req, issue, diagnostics) in cases {
        let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", issue).await;
        assert_eq!(reply.diagnostics(), diagnostics);
    }
    // With the ids, the same requests get their own answers.
    refused(
        &rig,
        int_test_request("GET", "/Patient"),
        404,
        "REC_NOT_FOUND",
        "not-found",
    )
    .await;
    refused(
        &rig,
        int_test_request("GET", "/$process-message"),
        405,
        "REC_METHOD_NOT_ALLOWED",
        "not-supported",
    )
    .await;
    refused(
        &rig,
        set(
            int_test_request("POST", "/$process-message"),
            "x-padding",
            &huge,
        ),
        431,
        "REC_BAD_REQUEST",
        "too-long",
    )
    .await;
}

// ---- the caller's format --------------------------------------------------------------------

#[tokio::test]
async fn refusals_are_fhir_xml_when_the_caller_prefers_xml() {
    let rig = Rig::start_with(|s| s.upstream.max_body = 64).await;
    let xml = |req: Req| set(req, "accept", "application/fhir+xml; version=1.0.0");
    let huge = "x".repeat(40 * 1024);
    let cases: Vec<(&str, Req, u16, &str, &str)> = vec![
        (
            "missing id",
            xml(without(int_test_request("GET", "/Patient"), "x-request-id")),
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
        (
            "malformed header",
            xml(set(
                int_test_request("POST", "/$process-message"),
                TARGET,
                "@@",
            )),
            400,
            "REC_BAD_REQUEST",
            "value",
        ),
        (
            "unsafe path",
            xml(int_test_request("GET", "/a/../metadata")),
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
        (
            "unknown path",
            xml(int_test_request("GET", "/Patient")),
            404,
            "REC_NOT_FOUND",
            "not-found",
        ),
        (
            "wrong method",
            xml(int_test_request("GET", "/$process-message")),
            405,
            "REC_METHOD_NOT_ALLOWED",
            "not-supported",
        ),
        (
            "unsupported version",
            set(
                int_test_request("POST", "/$process-message"),
                "accept",
                "application/fhir+xml; version=2.0.0",
            ),
            406,
            "REC_NOT_ACCEPTABLE",
            "processing",
        ),
        (
            "header section too large",
            xml(set(
                int_test_request("POST", "/$process-message"),
                "x-padding",
                &huge,
            )),
            431,
            "REC_BAD_REQUEST",
            "too-long",
        ),
        (
            "body too large",
            xml(set(
                int_test_request("POST", "/$process-message"),
                "content-length",
                "65",
            )),
            413,
            "REC_BAD_REQUEST",
            "too-long",
        ),
        (
            "_format=xml on the query",
            without(
                int_test_request("GET", "/Slot?_format=xml"),
                "x-correlation-id",
            ),
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
    ];
    for (case, mut req, status, code, issue) in cases {
        if case == "body too large" {
            *req.body_mut() = Full::new(Bytes::from(vec![b'x'; 65]));
        }
        let sent = req.headers().clone();
        let before = rig.upstream.count();
        let reply = rig.send(req).await;
        let diagnostics = assert_xml_outcome(&reply, status, code, issue);
        assert!(!diagnostics.is_empty(), "{case}");
        assert_ids_echoed(&sent, &reply);
        assert_eq!(
            rig.upstream.count(),
            before,
            "{case}: the upstream was called"
        );
        if status == 405 {
            assert_eq!(reply.headers["allow"], "POST");
        }
    }
    // The upstream unreachable: 503 in XML too.
    rig.upstream.stop();
    let reply = rig.send(xml(int_test_request("GET", "/Slot"))).await;
    assert_xml_outcome(&reply, 503, "REC_SERVICE_UNAVAILABLE", "transient");
    // JSON stays the default.
    let reply = rig.send(int_test_request("GET", "/Slot")).await;
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
}

#[tokio::test]
async fn an_xml_referral_is_delivered_byte_for_byte_and_its_retries_answered_in_xml() {
    let rig = Rig::start().await;
    rig.upstream.set_reply(Reply::With(
        StatusCode::CREATED,
        vec![
            ("content-type", "application/fhir+xml"),
            ("location", "/ServiceRequest/ref-111-ed"),
        ],
        Bytes::from_static(REFERRAL_XML),
    ));
    let id = uuid::Uuid::new_v4().to_string();
    let referral = |body: Bytes| {
        let mut req = set(
            set(
                set(
                    int_test_request("POST", "/$process-message"),
                    "x-request-id",
                    &id,
                ),
                "content-type",
                "application/fhir+xml; version=1.0.0",
            ),
            "accept",
            "application/fhir+xml; version=1.0.0",
        );
        *req.body_mut() = Full::new(body);
        req
    };
    let correlation = |req: &Req| req.headers()["x-correlation-id"].clone();
    let first = referral(Bytes::from_static(REFERRAL_XML));
    let correlation_id = correlation(&first);
    let reply = rig.send(first).await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        &reply.body[..],
        REFERRAL_XML,
        "the answer comes back byte for byte"
    );
    assert_eq!(reply.headers["x-request-id"], id.as_str());
    let seen = rig.upstream.only();
    assert_eq!(
        &seen.body[..],
        REFERRAL_XML,
        "the referral reaches the legacy system byte for byte"
    );
    assert_eq!(
        seen.headers["content-type"],
        "application/fhir+xml; version=1.0.0"
    );

    // The retry: same ids, same body.
    let mut retry = referral(Bytes::from_static(REFERRAL_XML));
    retry
        .headers_mut()
        .insert("x-correlation-id", correlation_id.clone());
    let reply = rig.send(retry).await;
    let diagnostics = assert_xml_outcome(&reply, 409, "REC_CONFLICT", "duplicate");
    assert_eq!(
        diagnostics,
        "This message has already been received and processed. Reference ID: ref-111-ed"
    );
    assert_eq!(reply.headers["x-request-id"], id.as_str());
    assert_eq!(reply.headers["x-correlation-id"], correlation_id);
    assert_eq!(
        rig.upstream.count(),
        1,
        "a retry never reaches the legacy system"
    );

    // The same id with one byte changed: 422, in XML.
    let mut changed = REFERRAL_XML.to_vec();
    let last = changed.len() - 2;
    changed[last] ^= 0x20;
    let mut other = referral(Bytes::from(changed));
    other
        .headers_mut()
        .insert("x-correlation-id", correlation_id);
    let reply = rig.send(other).await;
    assert_xml_outcome(&reply, 422, "REC_UNPROCESSABLE_ENTITY", "invalid");
    assert_eq!(rig.upstream.count(), 1);
}
