//! BaRS request validation end to end (issue 4), over real TLS-MA: routes, request ids, identity
//! headers, Accept, what the legacy receiver is sent, routing by NHSD-Target-Identifier, and the
//! FHIR conformance of the OperationOutcomes the gateway answers with.
//!
//! Every refusal asserts the status, the BaRS code and issue.code, diagnostics that name the header
//! or rule (and never echo decoded content), the ids echoed exactly as sent, and that the upstream
//! was never called.

mod common;

use std::path::Path;
use std::process::Command;

use bars_gateway::bars::identity::TargetIdentifier;
use bars_gateway::bars::Refusal;
use bars_gateway::config::UpstreamUrl;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::Full;
use serde_json::json;

/// The example set's target (`NHSD-Target-Identifier`), as `system|value`.
const EXAMPLE_TARGET: &str = "https://fhir.nhs.uk/Id/dos-service-id|2000011147";
/// The example set's ODS code (`NHSD-End-User-Organisation`).
const EXAMPLE_ODS_CODE: &str = "A1001";
const DOS_SYSTEM: &str = "https://fhir.nhs.uk/Id/dos-service-id";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// Planted in bad header values: no response may ever contain it (it stands for decoded content
/// such as an NHS number or a name).
const SECRET: &str = "9434765919";

const TARGET: &str = "NHSD-Target-Identifier";
const ORGANISATION: &str = "NHSD-End-User-Organisation";
const SOFTWARE: &str = "NHSD-Requesting-Software";
const PRACTITIONER: &str = "NHSD-Requesting-Practitioner";

type Req = Request<Full<Bytes>>;

// ---- helpers --------------------------------------------------------------------------------

/// A valid BaRS request (the example header set, fresh X-Request-Id) with an empty body.
fn request(method: &str, path: &str) -> Req {
    bars_request(method, path, Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Replaces (or adds) one header.
fn set(mut req: Req, name: &str, value: impl AsRef<[u8]>) -> Req {
    req.headers_mut().insert(
        header_name(name),
        HeaderValue::from_bytes(value.as_ref()).unwrap(),
    );
    req
}

/// Adds one more copy of a header.
fn append(mut req: Req, name: &str, value: impl AsRef<[u8]>) -> Req {
    req.headers_mut().append(
        header_name(name),
        HeaderValue::from_bytes(value.as_ref()).unwrap(),
    );
    req
}

/// Removes a header.
fn without(mut req: Req, name: &str) -> Req {
    req.headers_mut().remove(header_name(name));
    req
}

fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).unwrap()
}

fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

/// An encoded NHSD-Target-Identifier.
fn target_header(system: &str, value: &str) -> String {
    b64(&json!({ "system": system, "value": value }).to_string())
}

/// The ids a request carries, to compare with what the response echoes.
struct SentIds {
    request_id: Option<HeaderValue>,
    correlation_id: Option<HeaderValue>,
}

impl SentIds {
    fn of(req: &Req) -> SentIds {
        SentIds {
            request_id: req.headers().get("x-request-id").cloned(),
            correlation_id: req.headers().get("x-correlation-id").cloned(),
        }
    }

    /// Both ids echoed byte for byte when sent, absent when not.
    fn assert_echoed(&self, reply: &Reply2) {
        for (name, sent) in [
            ("x-request-id", &self.request_id),
            ("x-correlation-id", &self.correlation_id),
        ] {
            let echoed: Vec<_> = reply.headers.get_all(name).iter().collect();
            match sent {
                Some(value) => assert_eq!(echoed, vec![value], "{name} must be echoed as sent"),
                None => assert!(echoed.is_empty(), "{name} was not sent: {echoed:?}"),
            }
        }
    }
}

/// Sends a request that must be refused with `status code/issue`; checks the ids are echoed and
/// that no request reached the upstream. Returns the reply for diagnostics checks.
async fn refused(rig: &Rig, req: Req, status: u16, code: &str, issue: &str) -> Reply2 {
    let sent = SentIds::of(&req);
    let before = rig.upstream.count();
    let reply = rig.send(req).await;
    reply.assert_outcome(status, code, issue);
    sent.assert_echoed(&reply);
    assert_eq!(
        rig.upstream.count(),
        before,
        "a refused request must never reach the upstream"
    );
    reply
}

/// Sends a request that must be forwarded and answered 200; returns the reply and what the
/// upstream saw.
async fn forwarded(rig: &Rig, req: Req) -> (Reply2, Seen) {
    let sent = SentIds::of(&req);
    let before = rig.upstream.count();
    let reply = rig.send(req).await;
    assert_eq!(
        reply.status,
        200,
        "expected the request to be forwarded; body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    sent.assert_echoed(&reply);
    assert_eq!(
        rig.upstream.count(),
        before + 1,
        "exactly one upstream call"
    );
    let seen = rig.upstream.seen().pop().unwrap();
    (reply, seen)
}

/// The diagnostics are exactly `expected`, and nothing in the body contains any of `never`.
fn assert_diagnostics(reply: &Reply2, expected: &str, never: &[&str]) {
    assert_eq!(reply.diagnostics(), expected);
    let body = String::from_utf8_lossy(&reply.body);
    for secret in never.iter().chain([&SECRET]) {
        assert!(
            secret.is_empty() || !body.contains(secret),
            "the response echoes {secret:?}: {body}"
        );
    }
}

/// Starts a gateway from the standard config text for an upstream at `upstream_url + path`, with
/// `extra` TOML appended (so the config parser builds what the test needs).
async fn rig_with_config(upstream_path: &str, extra: &str) -> Rig {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let text = format!(
        "{}\n{extra}\n",
        pki.config_toml(&format!("{}{upstream_path}", upstream.url()))
    );
    let settings = pki.settings(&text);
    let gateway = TestGateway::start(settings).await;
    Rig {
        pki,
        upstream,
        gateway,
    }
}

// ---- routes ---------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_paths_get_404_not_found() {
    let rig = Rig::start().await;
    for path in [
        "/Patient",
        "/Metadata",
        "/metadata/",
        "/process-message",
        "/Appointment/a/b",
        "/",
    ] {
        let reply = refused(
            &rig,
            request("GET", path),
            404,
            "REC_NOT_FOUND",
            "not-found",
        )
        .await;
        let never = if path.len() > 1 { path } else { "" };
        assert_diagnostics(&reply, "No BaRS endpoint at this path", &[never]);
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn known_path_with_a_wrong_method_gets_405_with_allow() {
    let rig = Rig::start().await;
    for (method, path, allow) in [
        ("GET", "/$process-message", "POST"),
        ("PUT", "/$process-message", "POST"),
        ("POST", "/metadata", "GET"),
        ("DELETE", "/Slot", "GET"),
        ("PUT", "/Appointment", "GET, POST"),
        ("POST", "/ServiceRequest/sr-1", "GET, PUT, PATCH, DELETE"),
    ] {
        let reply = refused(
            &rig,
            request(method, path),
            405,
            "REC_METHOD_NOT_ALLOWED",
            "not-supported",
        )
        .await;
        assert_eq!(reply.headers["allow"], allow, "{method} {path}");
        assert_diagnostics(
            &reply,
            &format!("Method not allowed on this endpoint; allowed: {allow}"),
            &[],
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn process_message_answers_get_with_405_allow_post() {
    let rig = Rig::start().await;
    let reply = refused(
        &rig,
        request("GET", "/$process-message"),
        405,
        "REC_METHOD_NOT_ALLOWED",
        "not-supported",
    )
    .await;
    assert_eq!(reply.headers.get_all("allow").iter().count(), 1);
    assert_eq!(reply.headers["allow"], "POST");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn unsafe_paths_are_refused_with_400_invalid() {
    let rig = Rig::start().await;
    let cases = [
        ("/a/../metadata", "Dot-segments are not allowed in the path"),
        ("/./metadata", "Dot-segments are not allowed in the path"),
        (
            "/Appointment/..",
            "Dot-segments are not allowed in the path",
        ),
        (
            "/%2e%2e/metadata",
            "Percent-encoding other than %24 is not allowed in the path",
        ),
        (
            "/%2E/metadata",
            "Percent-encoding other than %24 is not allowed in the path",
        ),
        (
            "/metadata%2F..%2Fadmin",
            "Percent-encoding other than %24 is not allowed in the path",
        ),
        (
            "/Appointment%2f1",
            "Percent-encoding other than %24 is not allowed in the path",
        ),
        (
            "/%2524process-message",
            "Percent-encoding other than %24 is not allowed in the path",
        ),
        ("//metadata", "Empty path segments ('//') are not allowed"),
        (
            "/Appointment//1",
            "Empty path segments ('//') are not allowed",
        ),
        (
            "/metadata;jsessionid=1",
            "Path parameters (';') are not allowed in the path",
        ),
        (
            "/Patient/..;/metadata",
            "Path parameters (';') are not allowed in the path",
        ),
    ];
    for (path, diagnostics) in cases {
        let req = request("GET", path);
        assert_eq!(
            req.uri().path(),
            path,
            "the client must send the path as is"
        );
        let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
        assert_diagnostics(&reply, diagnostics, &[]);
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn percent_encoded_dollar_is_forwarded_as_process_message() {
    let rig = Rig::start().await;
    let (_, seen) = forwarded(&rig, request("POST", "/%24process-message")).await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri.path(), "/$process-message");
}

#[tokio::test]
async fn base_path_is_stripped_and_the_upstream_base_path_prepended() {
    let rig = rig_with_config("/legacy", "[bars]\nbase_path = \"/bars/FHIR/R4\"").await;
    let (_, seen) = forwarded(&rig, request("GET", "/bars/FHIR/R4/metadata")).await;
    assert_eq!(seen.uri.path(), "/legacy/metadata");

    let (_, seen) = forwarded(
        &rig,
        request(
            "GET",
            "/bars/FHIR/R4/MessageDefinition?context=booking-request",
        ),
    )
    .await;
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/legacy/MessageDefinition?context=booking-request"
    );

    let (_, seen) = forwarded(&rig, request("POST", "/bars/FHIR/R4/%24process-message")).await;
    assert_eq!(seen.uri.path(), "/legacy/$process-message");

    // Outside the base path nothing is served, not even a real endpoint name.
    for path in [
        "/metadata",
        "/bars/FHIR/R4",
        "/bars/FHIR/R4x/metadata",
        "/legacy/metadata",
    ] {
        refused(
            &rig,
            request("GET", path),
            404,
            "REC_NOT_FOUND",
            "not-found",
        )
        .await;
    }
    let reply = refused(
        &rig,
        request("GET", "/bars/FHIR/R4/$process-message"),
        405,
        "REC_METHOD_NOT_ALLOWED",
        "not-supported",
    )
    .await;
    assert_eq!(reply.headers["allow"], "POST");
    assert_eq!(rig.upstream.count(), 3);
}

#[tokio::test]
async fn allowed_paths_extra_prefix_is_forwarded_with_any_method() {
    let rig = rig_with_config("", "[bars]\nallowed_paths = [\"bars\", \"/Patient\"]").await;
    let (_, seen) = forwarded(&rig, request("GET", "/Patient/9?_format=json")).await;
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/Patient/9?_format=json"
    );
    let (_, seen) = forwarded(&rig, request("DELETE", "/Patient")).await;
    assert_eq!(seen.method, "DELETE");
    // BaRS endpoints are still served, other prefixes are not.
    forwarded(&rig, request("GET", "/metadata")).await;
    for path in ["/Patients", "/Practitioner/1"] {
        refused(
            &rig,
            request("GET", path),
            404,
            "REC_NOT_FOUND",
            "not-found",
        )
        .await;
    }
    // Extra paths are checked like write endpoints: the same identity rules (by default the
    // ids only; strict mode requires the identity headers there too).
    forwarded(
        &rig,
        without(request("GET", "/Patient/9"), "nhsd-requesting-software"),
    )
    .await;
    assert_eq!(rig.upstream.count(), 4);
    let strict = rig_with_config(
        "",
        "[bars]\nallowed_paths = [\"bars\", \"/Patient\"]\nrequire_identity_headers = true",
    )
    .await;
    refused(
        &strict,
        without(request("GET", "/Patient/9"), "nhsd-requesting-software"),
        400,
        "REC_BAD_REQUEST",
        "invalid",
    )
    .await;
}

// ---- ids ------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_request_id_gets_400_invalid_and_the_correlation_id_echoed() {
    let rig = Rig::start().await;
    let req = without(request("POST", "/$process-message"), "x-request-id");
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
    assert_diagnostics(&reply, "X-Request-Id header is missing", &[]);
    assert!(reply.headers.get("x-request-id").is_none());
    assert_eq!(
        reply.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn missing_correlation_id_gets_400_invalid_and_the_request_id_echoed() {
    let rig = Rig::start().await;
    let req = without(request("POST", "/$process-message"), "x-correlation-id");
    let request_id = req.headers()["x-request-id"].clone();
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
    assert_diagnostics(&reply, "X-Correlation-Id header is missing", &[]);
    assert_eq!(reply.headers["x-request-id"], request_id);
    assert!(reply.headers.get("x-correlation-id").is_none());

    // Both missing: X-Request-Id is reported first, nothing is echoed.
    let req = without(
        without(request("GET", "/Slot"), "x-request-id"),
        "x-correlation-id",
    );
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
    assert_diagnostics(&reply, "X-Request-Id header is missing", &[]);
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn malformed_ids_get_400_value_and_are_echoed_as_sent() {
    let rig = Rig::start().await;
    let not_uuid = "is not a UUID (8-4-4-4-12 hexadecimal digits)";
    let cases = [
        ("x-request-id", "X-Request-Id", "not-a-uuid", not_uuid),
        (
            "x-request-id",
            "X-Request-Id",
            "c1ab3fba6bae4ba4b2575a87c44d4a91",
            not_uuid,
        ),
        (
            "x-request-id",
            "X-Request-Id",
            "{c1ab3fba-6bae-4ba4-b257-5a87c44d4a91}",
            not_uuid,
        ),
        (
            "x-correlation-id",
            "X-Correlation-Id",
            "urn:uuid:9562466f-c982-4bd5-bb0e-255e9f5e6689",
            not_uuid,
        ),
        (
            "x-correlation-id",
            "X-Correlation-Id",
            "9562466f-c982-4bd5-bb0e-255e9f5e668g",
            not_uuid,
        ),
        (
            "x-correlation-id",
            "X-Correlation-Id",
            "9562466f c982 4bd5 bb0e 255e9f5e6689",
            "must be visible ASCII",
        ),
    ];
    for (key, name, value, problem) in cases {
        let req = set(request("POST", "/$process-message"), key, value);
        let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
        assert_diagnostics(
            &reply,
            &format!("{name} header is malformed: {problem}"),
            &[value],
        );
    }
    // Sent twice: ambiguous dedup key.
    let req = append(
        request("POST", "/$process-message"),
        "x-request-id",
        uuid::Uuid::new_v4().to_string(),
    );
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
    assert_diagnostics(
        &reply,
        "X-Request-Id header is malformed: sent more than once",
        &[],
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn ids_are_echoed_exactly_as_sent_on_success() {
    let rig = Rig::start().await;
    // Upper-case hex is a valid UUID: echoed as sent, not normalised; and forwarded as sent.
    let request_id = "C1AB3FBA-6BAE-4BA4-B257-5A87C44D4A91";
    let req = set(request("GET", "/metadata"), "x-request-id", request_id);
    let (reply, seen) = forwarded(&rig, req).await;
    assert_eq!(reply.headers["x-request-id"], request_id);
    assert_eq!(
        reply.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
    assert_eq!(seen.headers["x-request-id"], request_id);
    assert_eq!(
        seen.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
}

#[tokio::test]
async fn ids_are_echoed_even_when_the_upstream_answers_with_other_ids() {
    let rig = Rig::start().await;
    rig.upstream.set_reply(Reply::With(
        http::StatusCode::OK,
        vec![
            ("x-request-id", "00000000-0000-0000-0000-000000000000"),
            ("x-correlation-id", "11111111-1111-1111-1111-111111111111"),
        ],
        Bytes::from_static(b"{}"),
    ));
    let req = request("POST", "/$process-message");
    let (reply, _) = forwarded(&rig, req).await;
    assert_eq!(
        reply.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
}

// ---- identity headers -----------------------------------------------------------------------

/// One bad value for one identity header and the problem the diagnostics must name.
struct BadValue {
    header: &'static str,
    case: &'static str,
    value: Vec<u8>,
    /// Sent as a second copy next to the valid one instead of replacing it.
    twice: bool,
    problem: String,
}

/// A JSON object that is the header's resource in every way except where a case breaks it; each
/// carries [`SECRET`] so a response that echoed decoded content would be caught.
fn valid_json(header: &str) -> serde_json::Value {
    match header {
        TARGET => json!({ "system": DOS_SYSTEM, "value": SECRET }),
        ORGANISATION => json!({
            "resourceType": "Organization",
            "identifier": [{ "system": ODS_SYSTEM, "value": "A1001" }],
            "name": SECRET,
        }),
        SOFTWARE => json!({
            "resourceType": "Device",
            "identifier": [{ "system": "https://supplier.example/Id/device", "value": SECRET }],
            "deviceName": [{ "name": "Product", "type": "manufacturer-name" }],
            "version": [{ "value": "1.0.0" }],
        }),
        PRACTITIONER => json!({
            "resourceType": "PractitionerRole",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": SECRET }],
            "code": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "62247001" }] }],
        }),
        _ => unreachable!(),
    }
}

fn bad_values() -> Vec<BadValue> {
    let mut cases = Vec::new();
    for header in [TARGET, ORGANISATION, SOFTWARE, PRACTITIONER] {
        let valid = valid_json(header);
        let mut add = |case: &'static str, value: Vec<u8>, twice: bool, problem: &str| {
            cases.push(BadValue {
                header,
                case,
                value,
                twice,
                problem: problem.to_owned(),
            })
        };
        add(
            "bad Base64",
            format!("this-is-not-base-64-{SECRET}").into_bytes(),
            false,
            "is not valid Base64",
        );
        add(
            "URL-safe Base64",
            base64::engine::general_purpose::URL_SAFE
                .encode(r#"{"system":"s?>","value":"v~~?"}"#)
                .into_bytes(),
            false,
            "is not valid Base64",
        );
        add(
            "raw non-ASCII bytes",
            b"eyJ\xe9\xff".to_vec(),
            false,
            "is not valid Base64",
        );
        add(
            "not JSON",
            b64(&format!("system=s&value={SECRET}")).into_bytes(),
            false,
            "is not valid JSON",
        );
        add(
            "JSON array",
            b64(&format!("[{valid}]")).into_bytes(),
            false,
            "is not a JSON object",
        );
        add(
            "non-UTF-8 JSON",
            STANDARD
                .encode(
                    [
                        format!(r#"{{"system":"s","value":"{SECRET}"#).as_bytes(),
                        b"\xff\"}",
                    ]
                    .concat(),
                )
                .into_bytes(),
            false,
            "is not UTF-8",
        );
        let mut long = valid.clone();
        long["padding"] = json!("x".repeat(9000));
        add(
            "too long",
            b64(&long.to_string()).into_bytes(),
            false,
            "is too long",
        );
        add("empty", Vec::new(), false, "is empty");
        add(
            "duplicated header",
            b64(&valid.to_string()).into_bytes(),
            true,
            "sent more than once",
        );
        match header {
            TARGET => {
                add(
                    "missing value",
                    b64(&json!({ "system": DOS_SYSTEM }).to_string()).into_bytes(),
                    false,
                    "value must be a non-empty string",
                );
                add(
                    "numeric value",
                    b64(&format!(r#"{{"system":"{DOS_SYSTEM}","value":{SECRET}}}"#)).into_bytes(),
                    false,
                    "value must be a non-empty string",
                );
                add(
                    "missing system",
                    b64(&json!({ "value": SECRET }).to_string()).into_bytes(),
                    false,
                    "system must be a non-empty string",
                );
                add(
                    "header injection in value",
                    b64(
                        &json!({ "system": DOS_SYSTEM, "value": format!("{SECRET}\r\nX-Evil: 1") })
                            .to_string(),
                    )
                    .into_bytes(),
                    false,
                    "value contains control characters",
                );
                // A Target-Identifier is a bare Identifier: it has no resourceType to get wrong.
            }
            ORGANISATION => {
                add(
                    "missing value",
                    b64(&json!({
                        "resourceType": "Organization",
                        "identifier": [{ "system": ODS_SYSTEM }],
                        "name": SECRET,
                    })
                    .to_string())
                    .into_bytes(),
                    false,
                    "ODS organisation code value must be a non-empty string",
                );
                add(
                    "no ODS code",
                    b64(&json!({
                        "resourceType": "Organization",
                        "identifier": [{ "system": "https://other.example", "value": SECRET }],
                    })
                    .to_string())
                    .into_bytes(),
                    false,
                    "identifier has no ODS organisation code (system https://fhir.nhs.uk/Id/ods-organization-code)",
                );
                let mut wrong = valid.clone();
                wrong["resourceType"] = json!("Organisation");
                add(
                    "wrong resourceType",
                    b64(&wrong.to_string()).into_bytes(),
                    false,
                    r#"resourceType must be "Organization""#,
                );
            }
            SOFTWARE | PRACTITIONER => {
                let mut missing = valid.clone();
                missing["identifier"] =
                    json!([{ "system": format!("https://x.example/{SECRET}") }]);
                add(
                    "missing value",
                    b64(&missing.to_string()).into_bytes(),
                    false,
                    "identifier must contain an entry with a non-empty value",
                );
                let mut wrong = valid.clone();
                wrong["resourceType"] = json!("Practitioner");
                let expected = if header == SOFTWARE {
                    r#"resourceType must be "Device""#
                } else {
                    r#"resourceType must be "PractitionerRole""#
                };
                add(
                    "wrong resourceType",
                    b64(&wrong.to_string()).into_bytes(),
                    false,
                    expected,
                );
            }
            _ => unreachable!(),
        }
    }
    cases
}

/// A gateway in strict mode (`bars.require_identity_headers = true`).
async fn strict_rig() -> Rig {
    Rig::start_with(|s| s.bars.require_identity_headers = true).await
}

/// The problems that are refused in every mode: the value is not Base64 of a JSON text, or the
/// header is sent twice. The rest are shape problems, refused only in strict mode.
const UNDECODABLE: [&str; 7] = [
    "is not valid Base64",
    "is not valid JSON",
    "is not UTF-8",
    "is too long",
    "is empty",
    "sent more than once",
    "is nested too deeply",
];

#[tokio::test]
async fn bad_identity_header_values_get_400_value_naming_header_and_rule_in_strict_mode() {
    let rig = strict_rig().await;
    let cases = bad_values();
    assert!(cases.len() >= 4 * 11, "{} cases", cases.len());
    for case in cases {
        let base = request("POST", "/$process-message");
        let req = if case.twice {
            append(base, case.header, &case.value)
        } else {
            set(base, case.header, &case.value)
        };
        let sent = SentIds::of(&req);
        let before = rig.upstream.count();
        let reply = rig.send(req).await;
        let context = format!("{} / {}", case.header, case.case);
        assert_eq!(reply.status, 400, "{context}: {:?}", reply.body);
        reply.assert_outcome(400, "REC_BAD_REQUEST", "value");
        sent.assert_echoed(&reply);
        assert_eq!(
            rig.upstream.count(),
            before,
            "{context}: reached the upstream"
        );
        assert_eq!(
            reply.diagnostics(),
            format!("{} header is malformed: {}", case.header, case.problem),
            "{context}"
        );
        let body = String::from_utf8_lossy(&reply.body);
        let value = String::from_utf8_lossy(&case.value);
        assert!(
            !body.contains(SECRET),
            "{context}: decoded content echoed: {body}"
        );
        assert!(
            value.len() < 8 || !body.contains(value.as_ref()),
            "{context}: header value echoed: {body}"
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn by_default_undecodable_identity_headers_get_400_and_odd_shapes_are_forwarded() {
    let rig = Rig::start().await;
    let mut shapes = 0;
    for case in bad_values() {
        let base = request("POST", "/$process-message");
        let req = if case.twice {
            append(base, case.header, &case.value)
        } else {
            set(base, case.header, &case.value)
        };
        let context = format!("{} / {}", case.header, case.case);
        if UNDECODABLE.contains(&case.problem.as_str()) {
            let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
            assert_eq!(
                reply.diagnostics(),
                format!("{} header is malformed: {}", case.header, case.problem),
                "{context}"
            );
            continue;
        }
        shapes += 1;
        let (_, seen) = forwarded(&rig, req).await;
        // Forwarded untouched, and nothing derived from the header it came in.
        let key = header_name(case.header);
        assert_eq!(seen.headers[&key].as_bytes(), &case.value[..], "{context}");
        if case.header == TARGET && case.case == "numeric value" {
            // Not odd at all by default: the proxy routes a numeric value.
            assert_eq!(
                seen.headers["x-bars-target"],
                format!("{DOS_SYSTEM}|{SECRET}"),
                "{context}"
            );
        } else if case.header == TARGET {
            assert!(seen.headers.get("x-bars-target").is_none(), "{context}");
        }
        if case.header == ORGANISATION {
            assert!(seen.headers.get("x-bars-ods-code").is_none(), "{context}");
        }
    }
    assert!(shapes >= 4 * 2, "{shapes} shape cases");
}

#[tokio::test]
async fn missing_required_identity_headers_get_400_invalid_in_strict_mode() {
    let rig = strict_rig().await;
    for (key, name) in [
        ("nhsd-target-identifier", TARGET),
        ("nhsd-end-user-organisation", ORGANISATION),
        ("nhsd-requesting-software", SOFTWARE),
    ] {
        let req = without(request("POST", "/$process-message"), key);
        let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
        assert_diagnostics(&reply, &format!("{name} header is missing"), &[]);
    }
    // Target-Identifier is required on /MessageDefinition too.
    let req = without(
        request("GET", "/MessageDefinition"),
        "nhsd-target-identifier",
    );
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "invalid").await;
    assert_diagnostics(&reply, "NHSD-Target-Identifier header is missing", &[]);
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn every_valid_example_header_passes() {
    let rig = Rig::start().await;
    let examples: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/bars-examples/headers-examples.json")).unwrap();
    let observed = &examples["other_observed_values"];
    let decoded = &examples["decoded"];

    // The complete example set as it is.
    forwarded(&rig, request("POST", "/$process-message")).await;

    let variants: Vec<(&str, &'static str, String)> = vec![
        (
            "v1.0.0 schema Target-Identifier (spaces in the JSON)",
            "nhsd-target-identifier",
            observed["NHSD-Target-Identifier_v1.0.0_schema_example"]["encoded"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        (
            "metadata example Target-Identifier",
            "nhsd-target-identifier",
            b64(&observed["NHSD-Target-Identifier_metadata_example_json"].to_string()),
        ),
        (
            "Target-Identifier without padding",
            "nhsd-target-identifier",
            STANDARD_NO_PAD.encode(decoded["NHSD-Target-Identifier"]["json"].to_string() + "\n"),
        ),
        (
            "Target-Identifier with surrounding whitespace in the JSON and the header",
            "nhsd-target-identifier",
            format!(
                " {} ",
                b64(&format!(
                    "\n  {}  \n",
                    serde_json::to_string_pretty(&decoded["NHSD-Target-Identifier"]["json"])
                        .unwrap()
                ))
            ),
        ),
        (
            "Organisation re-encoded compact",
            "nhsd-end-user-organisation",
            b64(&decoded["NHSD-End-User-Organisation"]["json"].to_string()),
        ),
        (
            "Software re-encoded compact",
            "nhsd-requesting-software",
            b64(&decoded["NHSD-Requesting-Software"]["json"].to_string()),
        ),
        (
            "Software with FHIR R4 arrays for deviceName and version",
            "nhsd-requesting-software",
            b64(&valid_json(SOFTWARE).to_string()),
        ),
        (
            "Practitioner re-encoded pretty",
            "nhsd-requesting-practitioner",
            b64(
                &serde_json::to_string_pretty(&decoded["NHSD-Requesting-Practitioner"]["json"])
                    .unwrap(),
            ),
        ),
        (
            "Accept v1.0.0 example (single quotes)",
            "accept",
            observed["Accept_v1.0.0_example"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        (
            "Accept v1.3.0 example",
            "accept",
            observed["Accept_v1.3.0_example"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        (
            "use-context booking example",
            "use-context",
            observed["use-context_booking_example"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
    ];
    for (case, key, value) in variants {
        let req = set(request("POST", "/$process-message"), key, &value);
        let reply = rig.send(req).await;
        assert_eq!(
            reply.status,
            200,
            "{case}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let seen = rig.upstream.seen().pop().unwrap();
        // HTTP drops whitespace around a field value; the rest is forwarded byte for byte.
        assert_eq!(seen.headers[key], value.trim(), "{case}: forwarded as sent");
    }
    // Practitioner is optional.
    forwarded(
        &rig,
        without(
            request("POST", "/$process-message"),
            "nhsd-requesting-practitioner",
        ),
    )
    .await;
    assert_eq!(rig.upstream.count(), 13);
}

#[tokio::test]
async fn metadata_is_served_without_any_identity_header() {
    let rig = Rig::start().await;
    let mut req = request("GET", "/metadata");
    for key in [
        "nhsd-target-identifier",
        "nhsd-end-user-organisation",
        "nhsd-requesting-software",
        "nhsd-requesting-practitioner",
    ] {
        req = without(req, key);
    }
    let (_, seen) = forwarded(&rig, req).await;
    assert_eq!(seen.uri.path(), "/metadata");
    assert!(seen.headers.get("x-bars-target").is_none());
    assert!(seen.headers.get("x-bars-ods-code").is_none());
    // A present header is still validated.
    let req = set(request("GET", "/metadata"), "nhsd-target-identifier", "@@");
    refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
}

#[tokio::test]
async fn message_definition_is_served_without_organisation_or_software() {
    let rig = Rig::start().await;
    let req = without(
        without(
            request("GET", "/MessageDefinition?context=booking-request"),
            "nhsd-end-user-organisation",
        ),
        "nhsd-requesting-software",
    );
    let (_, seen) = forwarded(&rig, req).await;
    assert_eq!(seen.headers["x-bars-target"], EXAMPLE_TARGET);
    assert!(seen.headers.get("x-bars-ods-code").is_none());
}

#[tokio::test]
async fn organisation_and_software_are_optional_unless_strict_mode_requires_them() {
    let strict = strict_rig().await;
    let lenient = Rig::start().await;
    let bare = || {
        without(
            without(
                request("POST", "/$process-message"),
                "nhsd-end-user-organisation",
            ),
            "nhsd-requesting-software",
        )
    };
    let reply = refused(&strict, bare(), 400, "REC_BAD_REQUEST", "invalid").await;
    assert_diagnostics(&reply, "NHSD-End-User-Organisation header is missing", &[]);
    forwarded(&lenient, bare()).await;
    // Optional does not mean unchecked: what is not Base64 JSON is refused in every mode.
    let req = set(bare(), "nhsd-requesting-software", "@@");
    refused(&lenient, req, 400, "REC_BAD_REQUEST", "value").await;
    // The target is required in strict mode only (the default upstream needs none).
    let req = without(bare(), "nhsd-target-identifier");
    refused(&strict, req, 400, "REC_BAD_REQUEST", "invalid").await;
    let req = without(bare(), "nhsd-target-identifier");
    forwarded(&lenient, req).await;
    assert_eq!(strict.upstream.count(), 0);
    assert_eq!(lenient.upstream.count(), 2);
}

// ---- Accept ---------------------------------------------------------------------------------

#[tokio::test]
async fn unsupported_accept_major_version_gets_406_processing() {
    let rig = Rig::start().await;
    for accept in [
        "application/fhir+json; version=2.0.0",
        "application/fhir+json; version=0.9",
        "application/fhir+json; version=2",
        "application/fhir+json; version=1.4.0; q=0, application/fhir+json; version=2.0.0",
        "text/html",
    ] {
        let req = set(request("POST", "/$process-message"), "accept", accept);
        let reply = refused(&rig, req, 406, "REC_NOT_ACCEPTABLE", "processing").await;
        assert_diagnostics(
            &reply,
            "Accept asks for an unsupported version; supported major versions: 1",
            &[],
        );
    }
    // A version that cannot be read cannot be served either: 406, not 400.
    let req = set(
        request("POST", "/$process-message"),
        "accept",
        "application/fhir+json; version=one",
    );
    let reply = refused(&rig, req, 406, "REC_NOT_ACCEPTABLE", "processing").await;
    assert_diagnostics(
        &reply,
        "Accept asks for an unsupported version; supported major versions: 1",
        &[],
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn supported_accept_versions_pass() {
    let rig = Rig::start_with(|s| s.bars.accepted_major_versions = vec![1, 2]).await;
    for accept in [
        "application/fhir+json; version=1.4.0",
        "application/fhir+json;version=2.0.0",
        "application/fhir+json",
        "application/fhir+xml; version=1.0.0",
        "application/json",
        "*/*",
        "application/fhir+json; version=3.0.0, application/fhir+json; version=1.0.0",
    ] {
        let req = set(request("POST", "/$process-message"), "accept", accept);
        let (_, seen) = forwarded(&rig, req).await;
        assert_eq!(
            seen.headers["accept"], accept,
            "Accept is forwarded as sent"
        );
    }
    forwarded(
        &rig,
        without(request("POST", "/$process-message"), "accept"),
    )
    .await;
    let req = set(
        request("POST", "/$process-message"),
        "accept",
        "application/fhir+json; version=3.0.0",
    );
    let reply = refused(&rig, req, 406, "REC_NOT_ACCEPTABLE", "processing").await;
    assert_diagnostics(
        &reply,
        "Accept asks for an unsupported version; supported major versions: 1, 2",
        &[],
    );
}

// ---- what the legacy receiver gets ----------------------------------------------------------

#[tokio::test]
async fn decoded_target_and_ods_code_reach_the_upstream_and_spoofed_copies_do_not() {
    let rig = Rig::start().await;
    let mut req = request("POST", "/$process-message");
    for (name, value) in [
        ("x-bars-target", "https://evil.example|666"),
        ("x-bars-ods-code", "EVIL1"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-client-cert-subject", "CN=evil"),
        ("x-client-cert-sha256", "00"),
    ] {
        req = append(req, name, value);
        req = append(req, name, value);
    }
    let sent_nhsd: Vec<(String, HeaderValue)> = req
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("nhsd-"))
        .map(|(name, value)| (name.to_string(), value.clone()))
        .collect();
    assert_eq!(sent_nhsd.len(), 4);
    let req = set(req, "authorization", "Bearer sender-token");
    let (_, seen) = forwarded(&rig, req).await;
    let only = |name: &str| {
        let values: Vec<_> = seen.headers.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values[0].to_str().unwrap().to_owned()
    };
    assert_eq!(only("x-bars-target"), EXAMPLE_TARGET);
    assert_eq!(only("x-bars-ods-code"), EXAMPLE_ODS_CODE);
    assert_eq!(only("x-forwarded-for"), "127.0.0.1");
    assert_eq!(only("x-forwarded-proto"), "https");
    assert!(only("x-client-cert-subject").contains("CN=bars-proxy.spineservices.nhs.uk"));
    assert_eq!(
        only("x-client-cert-sha256"),
        rig.pki.client_sha256(ClientCert::Proxy)
    );
    // The NHSD headers pass untouched; the sender's token does not.
    for (name, value) in sent_nhsd {
        assert_eq!(
            seen.headers
                .get_all(name.as_str())
                .iter()
                .collect::<Vec<_>>(),
            vec![&value],
            "{name}"
        );
    }
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(
        seen.headers["use-context"],
        "a4t2|validation|servicerequest-response|new"
    );
}

#[tokio::test]
async fn spoofed_gateway_headers_are_removed_even_without_identity_headers() {
    let rig = Rig::start().await;
    let mut req = request("GET", "/metadata");
    for key in [
        "nhsd-target-identifier",
        "nhsd-end-user-organisation",
        "nhsd-requesting-software",
        "nhsd-requesting-practitioner",
    ] {
        req = without(req, key);
    }
    let req = set(
        set(req, "x-bars-target", "https://evil.example|666"),
        "x-bars-ods-code",
        "EVIL1",
    );
    let (_, seen) = forwarded(&rig, req).await;
    assert!(seen.headers.get("x-bars-target").is_none());
    assert!(seen.headers.get("x-bars-ods-code").is_none());
}

// ---- routing by NHSD-Target-Identifier ------------------------------------------------------

fn upstream_url(upstream: &TestUpstream) -> UpstreamUrl {
    UpstreamUrl {
        uri: upstream.url().parse().unwrap(),
        authority: upstream.addr.to_string(),
        base_path: String::new(),
    }
}

/// A rig whose default upstream is `rig.upstream` (unless `default` is false) plus one routed
/// upstream per target.
async fn routed_rig(default: bool, targets: &[&str]) -> (Rig, Vec<TestUpstream>) {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let mut settings = pki.settings(&pki.config_toml(&upstream.url()));
    let mut routed = Vec::new();
    for target in targets {
        let up = TestUpstream::start().await;
        let target: TargetIdentifier = target.parse().unwrap();
        settings.upstream.routes.push((target, upstream_url(&up)));
        routed.push(up);
    }
    if !default {
        settings.upstream.url = None;
    }
    let gateway = TestGateway::start(settings).await;
    (
        Rig {
            pki,
            upstream,
            gateway,
        },
        routed,
    )
}

#[tokio::test]
async fn requests_go_to_the_upstream_routed_for_their_target() {
    let other = format!("{DOS_SYSTEM}|2000099999");
    let (rig, routed) = routed_rig(true, &[EXAMPLE_TARGET, &other]).await;
    let to_target = |target: &str| {
        let (system, value) = target.split_once('|').unwrap();
        set(
            request("POST", "/$process-message"),
            "nhsd-target-identifier",
            target_header(system, value),
        )
    };
    let reply = rig.send(to_target(&other)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        (rig.upstream.count(), routed[0].count(), routed[1].count()),
        (0, 0, 1)
    );
    assert_eq!(routed[1].only().headers["x-bars-target"], other.as_str());

    let reply = rig.send(to_target(EXAMPLE_TARGET)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        (rig.upstream.count(), routed[0].count(), routed[1].count()),
        (0, 1, 1)
    );
    assert_eq!(routed[0].only().uri.path(), "/$process-message");

    // A target without a route goes to the default upstream.
    let reply = rig.send(to_target(&format!("{DOS_SYSTEM}|123"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        (rig.upstream.count(), routed[0].count(), routed[1].count()),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn unknown_target_without_a_default_upstream_gets_404_and_no_upstream_is_called() {
    let (rig, routed) = routed_rig(false, &[EXAMPLE_TARGET]).await;
    let req = set(
        request("POST", "/$process-message"),
        "nhsd-target-identifier",
        target_header(DOS_SYSTEM, SECRET),
    );
    let reply = refused(&rig, req, 404, "REC_NOT_FOUND", "not-found").await;
    assert_diagnostics(
        &reply,
        "No service is registered here for this NHSD-Target-Identifier",
        &[DOS_SYSTEM],
    );
    assert_eq!((rig.upstream.count(), routed[0].count()), (0, 0));
    // The routed target is still served.
    let reply = rig.send(request("POST", "/$process-message")).await;
    assert_eq!(reply.status, 200);
    assert_eq!((rig.upstream.count(), routed[0].count()), (0, 1));
}

// ---- FHIR conformance of the OperationOutcomes ----------------------------------------------

/// Every `Refusal` variant once. The `match` has no wildcard, so a new variant fails to compile
/// until it is listed here too.
fn every_refusal() -> Vec<Refusal> {
    let all = vec![
        Refusal::MissingHeader {
            header: "X-Request-Id",
        },
        Refusal::MalformedHeader {
            header: "NHSD-Target-Identifier",
            problem: "is not valid Base64".into(),
        },
        Refusal::InvalidRequest("Dot-segments are not allowed in the path".into()),
        Refusal::NotFound,
        Refusal::UnknownTarget,
        Refusal::MethodNotAllowed {
            allow: "POST".into(),
        },
        Refusal::NotAcceptable {
            supported: "1".into(),
        },
        Refusal::UpstreamTimeout,
        Refusal::BodyTimeout,
        Refusal::HeadersTooLarge { limit: 32768 },
        Refusal::Duplicate { reference: None },
        Refusal::Duplicate {
            reference: Some("ID-12345".into()),
        },
        Refusal::BodyTooLarge { limit: 10485760 },
        Refusal::IdReused,
        Refusal::InFlight,
        Refusal::Internal,
        Refusal::UpstreamUnavailable,
        Refusal::StoreUnavailable,
        Refusal::UpstreamBadResponse {
            problem: "an unsolicited protocol upgrade",
        },
        Refusal::ReplayTooLarge { status: 422 },
        Refusal::EgressTokenRefused {
            cause: "invalid_request: Invalid 'kid' (message_id rrt-1)".into(),
        },
        Refusal::EgressTokenUnavailable {
            cause: "no answer within 10s".into(),
        },
        Refusal::EgressNoAnswer {
            attempts: 4,
            timed_out: true,
            cause: "no response in time".into(),
        },
        Refusal::EgressNoAnswer {
            attempts: 4,
            timed_out: false,
            cause: "connection refused".into(),
        },
    ];
    for refusal in &all {
        match refusal {
            Refusal::MissingHeader { .. }
            | Refusal::MalformedHeader { .. }
            | Refusal::InvalidRequest(_)
            | Refusal::NotFound
            | Refusal::UnknownTarget
            | Refusal::MethodNotAllowed { .. }
            | Refusal::NotAcceptable { .. }
            | Refusal::UpstreamTimeout
            | Refusal::BodyTimeout
            | Refusal::HeadersTooLarge { .. }
            | Refusal::Duplicate { .. }
            | Refusal::BodyTooLarge { .. }
            | Refusal::IdReused
            | Refusal::InFlight
            | Refusal::Internal
            | Refusal::UpstreamUnavailable
            | Refusal::StoreUnavailable
            | Refusal::UpstreamBadResponse { .. }
            | Refusal::ReplayTooLarge { .. }
            | Refusal::EgressTokenRefused { .. }
            | Refusal::EgressTokenUnavailable { .. }
            | Refusal::EgressNoAnswer { .. } => {}
        }
    }
    all
}

/// Parses every `*.json` and `*.xml` in argv[1] with the fhir.resources OperationOutcome model
/// (R4B, else R4; its XML parser needs lxml). For XML it also checks that the element order is the
/// model's own (FHIR's) and, when a `.json` twin exists, that the XML says exactly what the JSON
/// says. Files named `broken-*` must be rejected (proof the check can fail). Exit 77: a package is
/// missing.
const FHIR_CHECK: &str = r#"
import json, pathlib, sys
try:
    from fhir.resources.R4B.operationoutcome import OperationOutcome, OperationOutcomeIssue
    release = "R4B"
except ImportError:
    try:
        from fhir.resources.R4.operationoutcome import OperationOutcome, OperationOutcomeIssue
        release = "R4"
    except ImportError:
        sys.exit(77)
import fhir.resources

directory = pathlib.Path(sys.argv[1])
files = sorted(directory.glob("*.json")) + sorted(directory.glob("*.xml"))
if any(path.suffix == ".xml" for path in files):
    try:
        from lxml import etree
    except ImportError:
        sys.exit(77)

def parse(path):
    if path.suffix == ".json":
        if hasattr(OperationOutcome, "model_validate_json"):
            return OperationOutcome.model_validate_json(path.read_text())
        return OperationOutcome.parse_raw(path.read_text())
    raw = path.read_bytes()
    oo = OperationOutcome.model_validate_xml(raw)
    mine = [e.tag for e in etree.fromstring(raw).iter()]
    canonical = [e.tag for e in etree.fromstring(oo.model_dump_xml()).iter()]
    assert mine == canonical, "element order %s, FHIR order %s" % (mine, canonical)
    twin = path.with_suffix(".json")
    if twin.exists():
        said = json.loads(oo.model_dump_json())
        expected = json.loads(twin.read_text())
        assert said == expected, "XML says %s, JSON says %s" % (said, expected)
    return oo

# The package types the fields but does not enforce value-set bindings; it publishes the
# IssueSeverity codes as field metadata, so check that binding with its own list.
fields = getattr(OperationOutcomeIssue, "model_fields", {})
extra = getattr(fields.get("severity"), "json_schema_extra", None) or {}
severities = extra.get("enum_values")

failures = 0
for path in files:
    broken = path.name.startswith("broken-")
    try:
        oo = parse(path)
        assert oo.issue, "issue must not be empty"
        for issue in oo.issue:
            assert severities is None or issue.severity in severities, "severity " + issue.severity
        ok = True
        detail = ""
    except Exception as e:
        ok = False
        detail = (type(e).__name__ + ": " + str(e)).replace("\n", " | ")[:300]
    if ok == broken:
        failures += 1
        print("UNEXPECTED", "accepted" if ok else "rejected", path.name, detail)
    else:
        print("ok", "(rejected as expected)" if broken else "", path.name)
print("fhir.resources", fhir.resources.__version__, release, len(files), "files,", failures, "unexpected")
sys.exit(1 if failures else 0)
"#;

#[tokio::test]
async fn operation_outcomes_parse_with_an_independent_fhir_model() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &serde_json::Value| {
        std::fs::write(
            dir.path().join(name),
            serde_json::to_vec_pretty(value).unwrap(),
        )
        .unwrap();
    };
    for (i, refusal) in every_refusal().iter().enumerate() {
        let oo = refusal.to_operation_outcome();
        assert_eq!(oo["issue"][0]["code"], refusal.issue_code());
        write(&format!("refusal-{i:02}-{}.json", refusal.reason()), &oo);
    }
    // One real refusal, exactly as the gateway sent it.
    let rig = Rig::start().await;
    let req = set(
        request("POST", "/$process-message"),
        "nhsd-target-identifier",
        "this-is-not-base-64",
    );
    let reply = refused(&rig, req, 400, "REC_BAD_REQUEST", "value").await;
    std::fs::write(dir.path().join("gateway-400.json"), &reply.body).unwrap();
    // A control the checker must reject: a misspelt element.
    let mut broken = Refusal::NotFound.to_operation_outcome();
    broken["issue"][0]["diagnostic"] = json!("misspelt");
    write("broken-misspelt-element.json", &broken);
    let mut broken = Refusal::NotFound.to_operation_outcome();
    broken["issue"][0]["severity"] = json!("catastrophic");
    write("broken-severity.json", &broken);

    run_fhir_check(dir.path());
}

// ---- the same OperationOutcomes in FHIR XML -------------------------------------------------

#[tokio::test]
async fn xml_operation_outcomes_parse_with_fhir_resources_and_say_what_the_json_says() {
    use bars_gateway::bars::render::{operation_outcome, Format};
    let dir = tempfile::tempdir().unwrap();
    for (i, refusal) in every_refusal().iter().enumerate() {
        let xml = String::from_utf8(operation_outcome(refusal, Format::Xml)).unwrap();
        let mut json = refusal.to_operation_outcome();
        json["id"] = json!(fhir_xml_value(&xml, "id"));
        let name = format!("refusal-{i:02}-{}", refusal.reason());
        std::fs::write(dir.path().join(format!("{name}.xml")), &xml).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.json")),
            serde_json::to_vec(&json).unwrap(),
        )
        .unwrap();
    }
    // Diagnostics with every character XML escapes.
    let tricky = Refusal::InvalidRequest("a & <b> \"c\" 'd'".into());
    std::fs::write(
        dir.path().join("escaped.xml"),
        operation_outcome(&tricky, Format::Xml),
    )
    .unwrap();
    // One real refusal, exactly as the gateway sent it.
    let rig = Rig::start().await;
    let req = set(
        set(
            request("POST", "/$process-message"),
            "nhsd-target-identifier",
            "this-is-not-base-64",
        ),
        "accept",
        "application/fhir+xml; version=1.0.0",
    );
    let reply = rig.send(req).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.headers["content-type"], "application/fhir+xml");
    std::fs::write(dir.path().join("gateway-400.xml"), &reply.body).unwrap();
    // Controls the checker must reject: a misspelt element, elements out of order, no namespace.
    let good = String::from_utf8(operation_outcome(&Refusal::NotFound, Format::Xml)).unwrap();
    let broken = [
        ("misspelt", good.replace("<diagnostics ", "<diagnostic ")),
        (
            "order",
            good.replace(
                r#"<severity value="error"/><code value="not-found"/>"#,
                r#"<code value="not-found"/><severity value="error"/>"#,
            ),
        ),
        (
            "namespace",
            good.replace(r#" xmlns="http://hl7.org/fhir""#, ""),
        ),
        ("severity", good.replace(r#""error""#, r#""catastrophic""#)),
    ];
    for (name, xml) in broken {
        assert_ne!(xml, good, "{name}: the control changed nothing");
        std::fs::write(dir.path().join(format!("broken-{name}.xml")), xml).unwrap();
    }
    run_fhir_check(dir.path());
}

/// Runs [`FHIR_CHECK`] over `dir`: SKIPPED without python3, fhir.resources or lxml, except under
/// CI, which installs them.
fn run_fhir_check(dir: &Path) {
    let packages = "fhir.resources==8.3.0 lxml";
    let output = match Command::new("python3")
        .arg("-c")
        .arg(FHIR_CHECK)
        .arg(dir)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            return skip(
                "FHIR conformance check",
                &format!(
                    "cannot run python3 ({e}); install Python 3 and then: pip install {packages}"
                ),
            );
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(77) {
        return skip(
            "FHIR conformance check",
            &format!("a Python package is missing: pip install {packages}"),
        );
    }
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "the FHIR check refused an OperationOutcome:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" 0 unexpected"), "{stdout}");
}
