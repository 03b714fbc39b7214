//! Unit tests of identity header decoding: the public entry points, the memo and the rules.

use super::memo::{MEMO_MAX_LEN, MEMO_SLOTS};
use super::wire::MAX_ENCODED_LEN;
use super::*;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
use base64::Engine as _;

const FIXTURE: &str = include_str!("../../../tests/fixtures/bars-examples/headers-examples.json");

const ALL: IdentityRequirements = IdentityRequirements {
    target: true,
    organisation: true,
    software: true,
};
const NONE: IdentityRequirements = IdentityRequirements {
    target: false,
    organisation: false,
    software: false,
};

const HEADERS: [&str; 4] = [
    NHSD_TARGET_IDENTIFIER,
    NHSD_END_USER_ORGANISATION,
    NHSD_REQUESTING_SOFTWARE,
    NHSD_REQUESTING_PRACTITIONER,
];

fn fixture() -> serde_json::Value {
    serde_json::from_str(FIXTURE).unwrap()
}

/// The valid request's four NHSD headers, as sent.
fn valid_headers() -> HeaderMap {
    let fixture = fixture();
    let sent = &fixture["valid_process_message_request"]["headers"];
    let mut map = HeaderMap::new();
    for name in HEADERS {
        let value = sent[name].as_str().unwrap();
        map.insert(name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn with(header: &'static str, value: &[u8]) -> HeaderMap {
    let mut map = valid_headers();
    map.insert(header, HeaderValue::from_bytes(value).unwrap());
    map
}

fn encoded(json: &str) -> String {
    STANDARD.encode(json)
}

#[test]
fn memoised_decoding_answers_exactly_as_decoding_does() {
    // Alternating values with the same memo slot count: every answer must be the value's own.
    let targets: Vec<String> = (0..(3 * MEMO_SLOTS))
        .map(|n| {
            encoded(&format!(
                r#"{{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"{n}"}}"#
            ))
        })
        .collect();
    for round in 0..3 {
        for (n, value) in targets.iter().enumerate() {
            let decoded =
                decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL)
                    .unwrap_or_else(|e| panic!("round {round}, {n}: {e}"));
            assert_eq!(
                decoded.target.unwrap().value,
                n.to_string(),
                "round {round}"
            );
        }
    }
    let first = decode_identity_headers(&valid_headers(), ALL).unwrap();
    let again = decode_identity_headers(&valid_headers(), ALL).unwrap();
    assert_eq!(first, again);
}

#[test]
fn a_refused_value_is_refused_every_time_even_next_to_a_memoised_one() {
    let good = encoded(r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"1"}"#);
    let bad = encoded(r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":""}"#);
    for _ in 0..3 {
        decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, good.as_bytes()), ALL).unwrap();
        assert_malformed(
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, bad.as_bytes()), ALL),
            NHSD_TARGET_IDENTIFIER,
            "value",
        );
    }
    // One byte changed after the valid value was memoised: decoded afresh, and refused.
    let mut tampered = good.into_bytes();
    tampered[3] = b'*';
    assert_malformed(
        decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, &tampered), ALL),
        NHSD_TARGET_IDENTIFIER,
        "Base64",
    );
}

#[test]
fn values_over_the_memo_bound_are_still_decoded() {
    let long = "x".repeat(MEMO_MAX_LEN);
    let value = encoded(&format!(
        r#"{{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"{long}"}}"#
    ));
    assert!(value.len() > MEMO_MAX_LEN);
    for _ in 0..2 {
        let decoded =
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL).unwrap();
        assert_eq!(decoded.target.unwrap().value, long);
    }
}

fn with_json(header: &'static str, json: &str) -> HeaderMap {
    with(header, encoded(json).as_bytes())
}

/// Asserts a 400 / value refusal naming `header` whose problem contains `problem`.
fn assert_malformed(result: Result<IdentityHeaders, Refusal>, header: &str, problem: &str) {
    let refusal = result.expect_err("should be refused");
    match &refusal {
        Refusal::MalformedHeader {
            header: h,
            problem: p,
        } => {
            assert_eq!(*h, header, "{refusal}");
            assert!(p.contains(problem), "expected {problem:?} in {refusal}");
        }
        other => panic!("expected MalformedHeader, got {other:?}"),
    }
    assert_eq!(refusal.status(), 400);
    assert_eq!(refusal.bars_code(), "REC_BAD_REQUEST");
    assert_eq!(refusal.issue_code(), "value");
    assert!(refusal.to_string().starts_with(header), "{refusal}");
}

const ORG_OK: &str = r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}],"name":"X"}"#;
const SOFTWARE_OK: &str = r#"{"resourceType":"Device","identifier":[{"system":"https://s.example/Id/device","value":"APP-1"}]}"#;

#[test]
fn every_valid_header_from_the_spec_example_passes() {
    let decoded = decode_identity_headers(&valid_headers(), ALL).unwrap();
    assert_eq!(
        decoded.target,
        Some(TargetIdentifier {
            system: "https://fhir.nhs.uk/Id/dos-service-id".into(),
            value: "2000011147".into(),
        })
    );
    assert_eq!(
        decoded.organisation,
        Some(EndUserOrganisation {
            ods_code: OdsCode("A1001".into())
        })
    );
    assert_eq!(
        decoded.software,
        Some(RequestingSoftware {
            id: Some("https://consumersupplier.com/Id/device-identifier|SUPP-APP-1".into())
        })
    );
    assert!(decoded.practitioner_present);
}

#[test]
fn spec_example_encodings_end_in_a_newline_inside_the_base64() {
    // Guards the premise of the tolerance: if the fixture changed, the test above would not
    // cover a trailing newline any more.
    let fixture = fixture();
    let sent = &fixture["valid_process_message_request"]["headers"];
    let org = STANDARD
        .decode(sent[NHSD_END_USER_ORGANISATION].as_str().unwrap())
        .unwrap();
    assert_eq!(org.last(), Some(&b'\n'));
}

#[test]
fn decoded_fixture_json_re_encoded_passes_for_every_header() {
    let fixture = fixture();
    let mut map = HeaderMap::new();
    for name in HEADERS {
        let json = fixture["decoded"][name]["json"].to_string();
        map.insert(name, HeaderValue::from_str(&encoded(&json)).unwrap());
    }
    let decoded = decode_identity_headers(&map, ALL).unwrap();
    assert_eq!(decoded.organisation.unwrap().ods_code.as_str(), "A1001");
}

#[test]
fn target_identifier_with_spaces_and_no_padding_passes() {
    let fixture = fixture();
    let observed =
        &fixture["other_observed_values"]["NHSD-Target-Identifier_v1.0.0_schema_example"];
    let value = observed["encoded"].as_str().unwrap();
    assert!(!value.ends_with('='));
    let decoded =
        decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL).unwrap();
    let target = decoded.target.unwrap();
    assert_eq!(target.to_string(), "tests|NHS0001");
}

#[test]
fn unpadded_encoding_passes() {
    // 28 and 29 bytes of JSON: two and one padding characters left off.
    for value in ["v12", "v123"] {
        let json = format!(r#"{{"system":"s","value":"{value}"}}"#);
        assert!(STANDARD.encode(&json).ends_with('='));
        let map = with(
            NHSD_TARGET_IDENTIFIER,
            STANDARD_NO_PAD.encode(&json).as_bytes(),
        );
        let decoded = decode_identity_headers(&map, ALL).unwrap();
        assert_eq!(decoded.target.unwrap().value, value);
    }
}

#[test]
fn whitespace_around_the_header_value_and_inside_the_json_passes() {
    let json = "\n\t {\"system\" : \"s\" , \"value\" : \"v\"} \r\n \n";
    let value = format!("  {}\t", encoded(json));
    let map = with(NHSD_TARGET_IDENTIFIER, value.as_bytes());
    assert_eq!(
        decode_identity_headers(&map, ALL)
            .unwrap()
            .target
            .unwrap()
            .to_string(),
        "s|v"
    );
}

#[test]
fn escaped_strings_are_decoded() {
    let json = r#"{"system":"https:\/\/fhir.nhs.uk\/Id\/dos-service-id","value":"\u0032000"}"#;
    let target = decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, json), ALL)
        .unwrap()
        .target
        .unwrap();
    assert_eq!(target.system, "https://fhir.nhs.uk/Id/dos-service-id");
    assert_eq!(target.value, "2000");
}

#[test]
fn repo_test_target_identifier_not_base64_is_refused() {
    let fixture = fixture();
    let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_not_base64"];
    let value = case[NHSD_TARGET_IDENTIFIER].as_str().unwrap();
    let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL);
    assert_malformed(
        result.clone(),
        NHSD_TARGET_IDENTIFIER,
        "is not valid Base64",
    );
    assert_eq!(
        result.unwrap_err().to_string(),
        "NHSD-Target-Identifier header is malformed: is not valid Base64"
    );
}

#[test]
fn repo_test_target_identifier_missing_value_is_refused() {
    let fixture = fixture();
    let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_missing_value"];
    let json = case["NHSD-Target-Identifier_json"].to_string();
    let result = decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL);
    assert_eq!(
        result.unwrap_err().to_string(),
        "NHSD-Target-Identifier header is malformed: value must be a non-empty string"
    );
}

#[test]
fn repo_test_unknown_target_value_is_well_formed_and_left_to_routing() {
    // The proxy answers 404 for an unknown target: that is `Refusal::UnknownTarget`, raised
    // where upstreams are chosen, not a header-shape problem.
    let fixture = fixture();
    let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_unknown_value"];
    let json = case["NHSD-Target-Identifier_json"].to_string();
    let decoded = decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).unwrap();
    assert_eq!(decoded.target.unwrap().value, "invalid");
}

#[test]
fn bad_header_values_are_refused_with_a_precise_problem() {
    let deep = format!(
        r#"{{"system":"s","value":"v","x":{}1{}}}"#,
        "[".repeat(16),
        "]".repeat(16)
    );
    let table: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad base64", b"@@@@".to_vec(), "is not valid Base64"),
        ("bad base64 length", b"eyJ".to_vec(), "is not valid Base64"),
        (
            "base64 with inner space",
            b"eyJz eXN0".to_vec(),
            "is not valid Base64",
        ),
        (
            "base64 with text after padding",
            b"eyI=eyI=".to_vec(),
            "is not valid Base64",
        ),
        (
            "url-safe alphabet",
            URL_SAFE
                .encode(r#"{"system":"s?>","value":"v~~?"}"#)
                .into_bytes(),
            "is not valid Base64",
        ),
        ("empty", b"".to_vec(), "is empty"),
        ("blank", b"   ".to_vec(), "is empty"),
        (
            "not json",
            encoded("system=s&value=v").into_bytes(),
            "is not valid JSON",
        ),
        (
            "truncated json",
            encoded(r#"{"system":"s","#).into_bytes(),
            "is not valid JSON",
        ),
        (
            "trailing garbage",
            encoded(r#"{"system":"s","value":"v"} x"#).into_bytes(),
            "is not valid JSON",
        ),
        (
            "json array",
            encoded(r#"[{"system":"s","value":"v"}]"#).into_bytes(),
            "is not a JSON object",
        ),
        (
            "json string",
            encoded(r#""s|v""#).into_bytes(),
            "is not a JSON object",
        ),
        (
            "json null",
            encoded("null").into_bytes(),
            "is not a JSON object",
        ),
        (
            "missing value",
            encoded(r#"{"system":"s"}"#).into_bytes(),
            "value must be a non-empty string",
        ),
        (
            "empty value",
            encoded(r#"{"system":"s","value":""}"#).into_bytes(),
            "value must be a non-empty string",
        ),
        (
            "blank value",
            encoded(r#"{"system":"s","value":"  "}"#).into_bytes(),
            "value must be a non-empty string",
        ),
        (
            "numeric value",
            encoded(r#"{"system":"s","value":2000011147}"#).into_bytes(),
            "value must be a non-empty string",
        ),
        (
            "null value",
            encoded(r#"{"system":"s","value":null}"#).into_bytes(),
            "value must be a non-empty string",
        ),
        (
            "missing system",
            encoded(r#"{"value":"v"}"#).into_bytes(),
            "system must be a non-empty string",
        ),
        (
            "object system",
            encoded(r#"{"system":{},"value":"v"}"#).into_bytes(),
            "system must be a non-empty string",
        ),
        (
            "pipe in system",
            encoded(r#"{"system":"a|b","value":"v"}"#).into_bytes(),
            "system must not contain '|'",
        ),
        (
            "newline in value",
            encoded(r#"{"system":"s","value":"v\r\nX-Evil: 1"}"#).into_bytes(),
            "value contains control characters",
        ),
        (
            "duplicate key",
            encoded(r#"{"system":"s","value":"v","value":"w"}"#).into_bytes(),
            "has a duplicate JSON field",
        ),
        (
            "deeply nested",
            encoded(&deep).into_bytes(),
            "is nested too deeply",
        ),
        (
            "non-utf-8",
            STANDARD
                .encode(b"{\"system\":\"s\xff\",\"value\":\"v\"}")
                .into_bytes(),
            "is not UTF-8",
        ),
        (
            "huge",
            encoded(&format!(
                r#"{{"system":"s","value":"{}"}}"#,
                "9".repeat(7000)
            ))
            .into_bytes(),
            "is too long",
        ),
    ];
    for (case, value, problem) in table {
        let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, &value), ALL);
        assert!(result.is_err(), "{case} should be refused");
        assert_malformed(result, NHSD_TARGET_IDENTIFIER, problem);
    }
}

#[test]
fn nesting_up_to_the_limit_passes() {
    let json = format!(
        r#"{{"system":"s","value":"v","x":{}1{}}}"#,
        "[".repeat(15),
        "]".repeat(15)
    );
    assert!(decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).is_ok());
    // Brackets inside strings do not count.
    let json = format!(
        r#"{{"system":"s","value":"v","x":"\"{}"}}"#,
        "[{".repeat(100)
    );
    assert!(decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).is_ok());
}

#[test]
fn header_of_exactly_the_limit_is_decoded() {
    let mut json = format!(
        r#"{{"system":"s","value":"v","pad":"{}"}}"#,
        "x".repeat(6000)
    );
    while STANDARD.encode(&json).len() < MAX_ENCODED_LEN {
        json.push(' ');
    }
    let value = STANDARD.encode(&json);
    assert_eq!(value.len(), MAX_ENCODED_LEN);
    assert!(decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL).is_ok());
    let value = format!("{value} ");
    let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL);
    assert_malformed(result, NHSD_TARGET_IDENTIFIER, "is too long");
}

#[test]
fn every_header_sent_twice_is_refused() {
    for name in HEADERS {
        let mut map = valid_headers();
        let value = map[name].clone();
        map.append(name, value);
        assert_malformed(
            decode_identity_headers(&map, ALL),
            name,
            "sent more than once",
        );
    }
}

#[test]
fn every_header_is_validated_when_present_even_if_not_required() {
    for name in HEADERS {
        let result = decode_identity_headers(&with(name, b"not base64!"), NONE);
        assert_malformed(result, name, "is not valid Base64");
        let result = decode_identity_headers(&with_json(name, "[]"), NONE);
        assert_malformed(result, name, "is not a JSON object");
    }
}

#[test]
fn required_headers_that_are_missing_are_refused_in_order() {
    let cases = [
        (NHSD_TARGET_IDENTIFIER, ALL),
        (
            NHSD_END_USER_ORGANISATION,
            IdentityRequirements {
                target: false,
                ..ALL
            },
        ),
        (
            NHSD_REQUESTING_SOFTWARE,
            IdentityRequirements {
                software: true,
                ..NONE
            },
        ),
    ];
    for (header, required) in cases {
        let refusal = decode_identity_headers(&HeaderMap::new(), required).unwrap_err();
        assert_eq!(refusal, Refusal::MissingHeader { header });
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.issue_code(), "invalid");
        assert!(refusal.to_string().starts_with(header));
    }
}

#[test]
fn headers_not_required_may_be_absent() {
    let decoded = decode_identity_headers(&HeaderMap::new(), NONE).unwrap();
    assert_eq!(decoded, IdentityHeaders::default());
    let mut map = valid_headers();
    map.remove(NHSD_REQUESTING_PRACTITIONER);
    map.remove(NHSD_END_USER_ORGANISATION);
    map.remove(NHSD_REQUESTING_SOFTWARE);
    let decoded = decode_identity_headers(
        &map,
        IdentityRequirements {
            target: true,
            ..NONE
        },
    )
    .unwrap();
    assert!(decoded.target.is_some());
    assert!(!decoded.practitioner_present);
}

#[test]
fn organisation_shape_rules_are_enforced() {
    let ods = ODS_ORGANIZATION_CODE_SYSTEM;
    let table: Vec<(String, &str)> = vec![
        (r#"{"identifier":[]}"#.into(), r#"resourceType must be "Organization""#),
        (
            format!(r#"{{"resourceType":"Organisation","identifier":[{{"system":"{ods}","value":"A1"}}]}}"#),
            r#"resourceType must be "Organization""#,
        ),
        (
            format!(r#"{{"resourceType":["Organization"],"identifier":[{{"system":"{ods}","value":"A1"}}]}}"#),
            r#"resourceType must be "Organization""#,
        ),
        (r#"{"resourceType":"Organization"}"#.into(), "identifier must be an array"),
        (
            format!(r#"{{"resourceType":"Organization","identifier":{{"system":"{ods}","value":"A1"}}}}"#),
            "identifier must be an array",
        ),
        (r#"{"resourceType":"Organization","identifier":["A1"]}"#.into(), "identifier entries must be objects"),
        (
            r#"{"resourceType":"Organization","identifier":[{"system":"https://other/Id","value":"A1"}]}"#.into(),
            "identifier has no ODS organisation code",
        ),
        (r#"{"resourceType":"Organization","identifier":[]}"#.into(), "identifier has no ODS organisation code"),
        (
            format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}"}}]}}"#),
            "ODS organisation code value must be a non-empty string",
        ),
        (
            format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":""}}]}}"#),
            "ODS organisation code value must be a non-empty string",
        ),
        (
            format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":7}}]}}"#),
            "identifier value must be a string",
        ),
        (
            format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":"A1"}},{{"system":"{ods}","value":"B2"}}]}}"#),
            "more than one ODS organisation code",
        ),
        (
            format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":"A1"}}],"name":{{"text":"x"}}}}"#),
            "name must be a string",
        ),
    ];
    for (json, problem) in table {
        let result = decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL);
        assert_malformed(result, NHSD_END_USER_ORGANISATION, problem);
    }
}

#[test]
fn organisation_without_ods_code_is_refused() {
    let json = r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/other","value":"A1001"}],"name":"X"}"#;
    let result = decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, json), ALL);
    assert_malformed(
        result,
        NHSD_END_USER_ORGANISATION,
        "no ODS organisation code",
    );
}

#[test]
fn organisation_finds_the_ods_code_among_other_identifiers_and_fields() {
    let ods = ODS_ORGANIZATION_CODE_SYSTEM;
    let json = format!(
        r#"{{"resourceType":"Organization","id":"x","meta":{{"profile":["p"]}},"identifier":[{{"system":"https://other","value":"Z9"}},{{"use":"official","system":"{ods}","value":"RX1"}},{{"system":"{ods}","value":"RX1"}}],"active":true}}"#
    );
    let decoded =
        decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL).unwrap();
    assert_eq!(decoded.organisation.unwrap().ods_code.to_string(), "RX1");
    // name is optional.
    let decoded =
        decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, ORG_OK), ALL).unwrap();
    assert!(decoded.organisation.is_some());
}

#[test]
fn software_device_name_and_version_as_object_array_or_absent_are_accepted() {
    let base = r#""resourceType":"Device","identifier":[{"system":"https://s/Id","value":"APP"}]"#;
    let variants = [
        "",
        r#","deviceName":{"name":"N","type":"manufacturer-name"},"version":{"value":"1.0.0"}"#,
        r#","deviceName":[{"name":"N","type":"manufacturer-name"}],"version":[{"value":"1.0.0"}]"#,
        r#","deviceName":[{"name":"N"}],"version":{"value":"1"}"#,
        r#","deviceName":null"#,
    ];
    for extra in variants {
        let json = format!("{{{base}{extra}}}");
        let decoded = decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, &json), ALL)
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert_eq!(
            decoded.software.unwrap().id.as_deref(),
            Some("https://s/Id|APP")
        );
    }
}

#[test]
fn software_shape_rules_are_enforced() {
    let table = [
        (
            r#"{"identifier":[{"value":"A"}]}"#,
            r#"resourceType must be "Device""#,
        ),
        (
            r#"{"resourceType":"Organization","identifier":[{"value":"A"}]}"#,
            r#"resourceType must be "Device""#,
        ),
        (
            r#"{"resourceType":"Device"}"#,
            "identifier must be an array",
        ),
        (
            r#"{"resourceType":"Device","identifier":[]}"#,
            "identifier must contain an entry with a non-empty value",
        ),
        (
            r#"{"resourceType":"Device","identifier":[{"system":"s"}]}"#,
            "identifier must contain an entry with a non-empty value",
        ),
        (
            r#"{"resourceType":"Device","identifier":[{"system":"s","value":""}]}"#,
            "identifier must contain an entry with a non-empty value",
        ),
        (
            r#"{"resourceType":"Device","identifier":[{"system":1,"value":"A"}]}"#,
            "identifier system must be a string",
        ),
        (
            r#"{"resourceType":"Device","identifier":[{"value":"A"}],"deviceName":"N"}"#,
            "deviceName must be an object or an array",
        ),
        (
            r#"{"resourceType":"Device","identifier":[{"value":"A"}],"version":"1.0.0"}"#,
            "version must be an object or an array",
        ),
    ];
    for (json, problem) in table {
        let result = decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, json), ALL);
        assert_malformed(result, NHSD_REQUESTING_SOFTWARE, problem);
    }
}

#[test]
fn software_id_is_the_first_identifier_with_a_value() {
    let json = r#"{"resourceType":"Device","identifier":[{"system":"s0","value":""},{"value":"APP-2"},{"system":"s3","value":"APP-3"}]}"#;
    let decoded = decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, json), ALL).unwrap();
    assert_eq!(decoded.software.unwrap().id.as_deref(), Some("APP-2"));
    let decoded =
        decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, SOFTWARE_OK), ALL).unwrap();
    assert_eq!(
        decoded.software.unwrap().id.as_deref(),
        Some("https://s.example/Id/device|APP-1")
    );
}

#[test]
fn practitioner_shape_rules_are_enforced() {
    let table = [
        (
            r#"{"resourceType":"Practitioner","identifier":[{"value":"1"}]}"#,
            r#"resourceType must be "PractitionerRole""#,
        ),
        (
            r#"{"resourceType":"PractitionerRole"}"#,
            "identifier must be an array",
        ),
        (
            r#"{"resourceType":"PractitionerRole","identifier":[{"system":"s"}]}"#,
            "identifier must contain an entry with a non-empty value",
        ),
        (
            r#"{"resourceType":"PractitionerRole","identifier":[{"value":"1"}],"code":{"coding":[]}}"#,
            "code must be an array",
        ),
    ];
    for (json, problem) in table {
        let result = decode_identity_headers(&with_json(NHSD_REQUESTING_PRACTITIONER, json), ALL);
        assert_malformed(result, NHSD_REQUESTING_PRACTITIONER, problem);
    }
}

#[test]
fn practitioner_with_any_identifier_and_no_resource_type_is_accepted() {
    let json = r#"{"identifier":[{"system":"https://other/Id","value":"555"}]}"#;
    let decoded =
        decode_identity_headers(&with_json(NHSD_REQUESTING_PRACTITIONER, json), ALL).unwrap();
    assert!(decoded.practitioner_present);
}

#[test]
fn spec_placeholder_practitioner_example_is_refused_for_its_resource_type() {
    let fixture = fixture();
    let value = fixture["decoded"][NHSD_REQUESTING_PRACTITIONER]["spec_schema_example_encoded"]
        .as_str()
        .unwrap();
    let result =
        decode_identity_headers(&with(NHSD_REQUESTING_PRACTITIONER, value.as_bytes()), ALL);
    assert_malformed(result, NHSD_REQUESTING_PRACTITIONER, "resourceType must be");
}

#[test]
fn diagnostics_never_echo_decoded_content() {
    let secret = "9434765919-PATIENT";
    let jsons = [
        format!(r#"{{"resourceType":"{secret}","identifier":[]}}"#),
        format!(
            r#"{{"resourceType":"Organization","identifier":[{{"system":"{secret}","value":"{secret}"}}]}}"#
        ),
        format!(
            r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_ORGANIZATION_CODE_SYSTEM}","value":7}}],"{secret}":1}}"#
        ),
        format!(r#"{{"resourceType":"Organization","{secret}":"#),
        format!(r#"{{"resourceType":"Organization","name":{{"x":"{secret}"}}}}"#),
        format!(r#"{{"resourceType":"Organization","resourceType":"{secret}"}}"#),
    ];
    for json in jsons {
        let refusal = decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL)
            .unwrap_err();
        assert!(!refusal.to_string().contains(secret), "{refusal}");
    }
}

#[test]
fn target_identifier_parses_and_displays_route_keys() {
    let target: TargetIdentifier = "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
        .parse()
        .unwrap();
    assert_eq!(target.system, "https://fhir.nhs.uk/Id/dos-service-id");
    assert_eq!(target.value, "2000011147");
    assert_eq!(
        target.to_string(),
        "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
    );
    let target: TargetIdentifier = "s|a|b".parse().unwrap();
    assert_eq!(
        (target.system.as_str(), target.value.as_str()),
        ("s", "a|b")
    );
    for bad in ["", "|", "s|", "|v", "sv", " |v", "s|\n"] {
        assert_eq!(
            bad.parse::<TargetIdentifier>(),
            Err(InvalidTargetIdentifier),
            "{bad:?}"
        );
    }
}

#[test]
fn decoded_target_matches_the_parsed_route_key() {
    let decoded = decode_identity_headers(&valid_headers(), ALL).unwrap();
    let key: TargetIdentifier = "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
        .parse()
        .unwrap();
    assert_eq!(decoded.target, Some(key));
}

const LENIENT: IdentityPolicy = IdentityPolicy {
    required: NONE,
    strict: false,
    target_needed: false,
};

/// A map with only `header`, set to the Base64 of `json`.
fn only(header: &'static str, json: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(header, HeaderValue::from_str(&encoded(json)).unwrap());
    map
}

fn lenient(map: &HeaderMap) -> IdentityHeaders {
    read_identity_headers(map, LENIENT).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn lenient_mode_reads_the_forms_the_proxy_routes() {
    let d = lenient(&only(
        NHSD_TARGET_IDENTIFIER,
        r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":2000011147}"#,
    ));
    assert_eq!(
        d.target.unwrap().to_string(),
        "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
    );
    assert!(d.warnings.is_empty());
    for json in [
        r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
        r#"{"resourceType":"Organization","identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}}"#,
        r#"{"resourceType":"Organization","identifier":[{"system":"http://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
        r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organisation-code","value":"A1001"}]}"#,
        r#"{"identifier":{"system":"http://fhir.nhs.uk/Id/ods-organisation-code","value":"A1001"},"name":{"text":"x"}}"#,
    ] {
        let d = lenient(&only(NHSD_END_USER_ORGANISATION, json));
        assert_eq!(
            d.organisation.map(|o| o.ods_code.0).as_deref(),
            Some("A1001"),
            "{json}"
        );
        assert!(d.warnings.is_empty(), "{json}");
    }
    let d = lenient(&only(
        NHSD_END_USER_ORGANISATION,
        r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":12345}]}"#,
    ));
    assert_eq!(d.organisation.unwrap().ods_code.as_str(), "12345");
    for json in [
        r#"{"identifier":{"system":"https://s/Id","value":"APP"},"deviceName":"N","version":"1"}"#,
        r#"{"resourceType":"Device","identifier":[{"system":"https://s/Id","value":"APP"}]}"#,
    ] {
        let d = lenient(&only(NHSD_REQUESTING_SOFTWARE, json));
        assert_eq!(
            d.software.unwrap().id.as_deref(),
            Some("https://s/Id|APP"),
            "{json}"
        );
    }
    let d = lenient(&only(
        NHSD_REQUESTING_PRACTITIONER,
        r#"{"identifier":{"value":555},"code":{"coding":[]}}"#,
    ));
    assert!(d.practitioner_present);
    assert!(d.warnings.is_empty());
}

#[test]
fn lenient_mode_forwards_unexpected_shapes_with_a_warning_and_no_value() {
    let ods = ODS_ORGANIZATION_CODE_SYSTEM;
    let table: Vec<(&'static str, String, ShapeProblem)> = vec![
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"s"}"#.into(),
            ShapeProblem::NoValue,
        ),
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"value":"v"}"#.into(),
            ShapeProblem::NoSystem,
        ),
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"a|b","value":"v"}"#.into(),
            ShapeProblem::PipeInSystem,
        ),
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"s","value":"v\n"}"#.into(),
            ShapeProblem::ControlCharacters,
        ),
        (
            NHSD_TARGET_IDENTIFIER,
            r#"["s","v"]"#.into(),
            ShapeProblem::NotAnObject,
        ),
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"s","value":"v","value":"w"}"#.into(),
            ShapeProblem::DuplicateField,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#"{"identifier":[{"system":"https://other/Id","value":"A1"}]}"#.into(),
            ShapeProblem::NoOdsCode,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            format!(r#"{{"identifier":[{{"system":"{ods}","value":""}}]}}"#),
            ShapeProblem::NoOdsCode,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            format!(
                r#"{{"resourceType":"Organisation","identifier":[{{"system":"{ods}","value":"A1"}}]}}"#
            ),
            ShapeProblem::WrongResourceType,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            format!(
                r#"{{"identifier":[{{"system":"{ods}","value":"A1"}},{{"system":"{ods}","value":"B2"}}]}}"#
            ),
            ShapeProblem::SeveralOdsCodes,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#"{"identifier":"A1"}"#.into(),
            ShapeProblem::BadIdentifier,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#""A1""#.into(),
            ShapeProblem::NotAnObject,
        ),
        (
            NHSD_REQUESTING_SOFTWARE,
            r#"{"resourceType":"Device","identifier":[]}"#.into(),
            ShapeProblem::NoIdentifierValue,
        ),
        (
            NHSD_REQUESTING_SOFTWARE,
            r#"{"identifier":[{"system":{},"value":"A"}]}"#.into(),
            ShapeProblem::BadIdentifier,
        ),
        (
            NHSD_REQUESTING_PRACTITIONER,
            r#"{"resourceType":"Practitioner","identifier":[{"value":"1"}]}"#.into(),
            ShapeProblem::WrongResourceType,
        ),
    ];
    for (header, json, problem) in table {
        let d = lenient(&only(header, &json));
        assert_eq!(
            d.warnings,
            vec![IdentityWarning { header, problem }],
            "{header}: {json}"
        );
        assert_eq!(d.target, None, "{json}");
        assert_eq!(d.organisation, None, "{json}");
        assert_eq!(d.software, None, "{json}");
        assert!(!d.practitioner_present, "{json}");
    }
}

#[test]
fn lenient_mode_still_refuses_what_is_not_base64_json() {
    for name in HEADERS {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_static("not base64!"));
        assert_malformed(
            read_identity_headers(&map, LENIENT),
            name,
            "is not valid Base64",
        );
        let map = only(name, r#"{"system":"s","#);
        assert_malformed(
            read_identity_headers(&map, LENIENT),
            name,
            "is not valid JSON",
        );
    }
    let mut map = only(NHSD_TARGET_IDENTIFIER, r#"{"system":"s","value":"v"}"#);
    let value = map[NHSD_TARGET_IDENTIFIER].clone();
    map.append(NHSD_TARGET_IDENTIFIER, value);
    assert_malformed(
        read_identity_headers(&map, LENIENT),
        NHSD_TARGET_IDENTIFIER,
        "sent more than once",
    );
}

#[test]
fn a_target_needed_for_routing_is_refused_when_it_cannot_be_read() {
    let policy = IdentityPolicy {
        target_needed: true,
        ..LENIENT
    };
    assert_malformed(
        read_identity_headers(&only(NHSD_TARGET_IDENTIFIER, r#"{"system":"s"}"#), policy),
        NHSD_TARGET_IDENTIFIER,
        "value must be a non-empty string",
    );
    // Other headers stay lenient.
    let d = read_identity_headers(&only(NHSD_END_USER_ORGANISATION, "{}"), policy).unwrap();
    assert_eq!(d.warnings.len(), 1);
}

#[test]
fn strict_mode_refuses_the_lenient_forms() {
    let table = [
        (
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":2000011147}"#,
            "value must be a non-empty string",
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
            r#"resourceType must be "Organization""#,
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#"{"resourceType":"Organization","identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}}"#,
            "identifier must be an array",
        ),
        (
            NHSD_END_USER_ORGANISATION,
            r#"{"resourceType":"Organization","identifier":[{"system":"http://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
            "identifier has no ODS organisation code",
        ),
        (
            NHSD_REQUESTING_SOFTWARE,
            r#"{"identifier":[{"value":"APP"}]}"#,
            r#"resourceType must be "Device""#,
        ),
    ];
    for (header, json, problem) in table {
        let result = decode_identity_headers(&only(header, json), NONE);
        assert_malformed(result, header, problem);
    }
}

#[test]
fn the_memo_answers_for_the_mode_a_value_was_read_in() {
    let map = only(
        NHSD_TARGET_IDENTIFIER,
        r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":7}"#,
    );
    for _ in 0..2 {
        assert_eq!(lenient(&map).target.unwrap().value, "7");
        assert_malformed(
            decode_identity_headers(&map, NONE),
            NHSD_TARGET_IDENTIFIER,
            "value must be a non-empty string",
        );
    }
}

/// xorshift64: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte_from(&mut self, alphabet: &[u8]) -> u8 {
        alphabet[self.below(alphabet.len())]
    }
}

fn mutate(rng: &mut Rng, input: &[u8], alphabet: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.below(out.len())
        };
        match rng.below(6) {
            0 if !out.is_empty() => out[at] = rng.byte_from(alphabet),
            1 => out.insert(at, rng.byte_from(alphabet)),
            2 if !out.is_empty() => {
                out.remove(at);
            }
            3 => out.truncate(at),
            4 => {
                let end = (at + rng.below(16)).min(out.len());
                let copy = out[at..end].to_vec();
                let to = rng.below(out.len() + 1);
                out.splice(to..to, copy);
            }
            _ if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            _ => {}
        }
    }
    out
}

/// Decodes `value` as every header; any refusal must name the header it is about.
fn decode_never_panics(value: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    for name in HEADERS {
        let mut map = valid_headers();
        map.insert(name, value.clone());
        if let Err(refusal) = decode_identity_headers(&map, ALL) {
            assert!(refusal.to_string().starts_with(name), "{refusal}");
            assert_eq!(refusal.status(), 400);
        }
        // Lenient mode refuses less, never more, and warns only about the changed header.
        match read_identity_headers(&map, LENIENT) {
            Err(refusal) => {
                assert!(refusal.to_string().starts_with(name), "{refusal}");
                assert!(decode_identity_headers(&map, ALL).is_err());
            }
            Ok(decoded) => assert!(decoded.warnings.iter().all(|w| w.header == name)),
        }
    }
}

#[test]
fn fuzzed_headers_never_panic_the_decoder() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let fixture = fixture();
    let encoded_values: Vec<String> = HEADERS
        .iter()
        .map(|name| {
            fixture["valid_process_message_request"]["headers"][name]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let json_texts: Vec<String> = HEADERS
        .iter()
        .map(|name| fixture["decoded"][name]["json"].to_string())
        .collect();
    let base64_alphabet =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \t!";
    let json_alphabet = b"{}[]\":,\\ \n0123456789.eE-+truefalsnul\x00\x7f\xc3\xa9\xff";
    for _ in 0..3000 {
        // Mutated Base64 text.
        let source = &encoded_values[rng.below(encoded_values.len())];
        decode_never_panics(&mutate(&mut rng, source.as_bytes(), base64_alphabet));
        // Mutated JSON, validly encoded: exercises the JSON and shape rules.
        let source = &json_texts[rng.below(json_texts.len())];
        decode_never_panics(
            STANDARD
                .encode(mutate(&mut rng, source.as_bytes(), json_alphabet))
                .as_bytes(),
        );
        // Random bytes, both raw and encoded.
        let random: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
        decode_never_panics(&random);
        decode_never_panics(STANDARD.encode(&random).as_bytes());
    }
}
