//! Accept: checks that the `Accept` header allows a BaRS API major version this receiver serves
//! (BARS-CONTEXT.md: "`application/fhir+json; version=1.x.y`; a major-version mismatch gets 406").
//!
//! Quotes: the spec's own v1.0.0 example is `'application/fhir+json; version=1.0.0'`, single quotes
//! included, so senders that copied it send them. Single quotes mean nothing in HTTP and cannot
//! change which media range is meant, so a pair wrapping the whole value, a whole range, or a
//! `version` value is tolerated (as are RFC 9110 double quotes around a parameter value), rather
//! than refusing a request the central proxy let through.

use http::HeaderMap;

use crate::bars::errors::Refusal;
use crate::bars::headers::ACCEPT;
use crate::bars::render::Format;

/// `version` when a FHIR media range has none: the BaRS proxy assumes 1.0.0.
const DEFAULT_MAJOR: u64 = 1;

/// Accepts the request when it has no `Accept` header or when at least one media range is
/// acceptable: `*/*`, `application/*`, `application/json`, `application/xml`, or
/// `application/fhir+json` / `application/fhir+xml` whose `version` major (default 1) is in
/// `accepted_major_versions`. Ranges with `q=0` are refusals and never count.
///
/// Otherwise `NotAcceptable` (406) listing the supported majors. A `version` is matched by its
/// major, pre-release suffixes included (`1.4.0-alpha` is major 1: the IG's own version strings
/// have them); a range whose `version` cannot be read at all cannot be served, so it does not
/// count, and alone it gets the 406 too.
pub fn check_accept(headers: &HeaderMap, accepted_major_versions: &[u64]) -> Result<(), Refusal> {
    let mut seen_range = false;
    let mut acceptable = false;
    // Several Accept lines are one comma-separated list (RFC 9110 §5.3).
    for value in headers.get_all(http::header::ACCEPT) {
        let text = value
            .to_str()
            .map_err(|_| malformed("must be visible ASCII"))?;
        for range in split_ranges(strip_single_quotes(text.trim())) {
            let range = strip_single_quotes(range.trim());
            if range.is_empty() {
                // RFC 9110 list syntax allows empty elements.
                continue;
            }
            seen_range = true;
            // Evaluate every range, even after an acceptable one, so a malformed version anywhere
            // is reported (it is a malformed header whatever else it says).
            if range_is_acceptable(range, accepted_major_versions)? {
                acceptable = true;
            }
        }
    }
    // An empty Accept value states no preference: treated like an absent header.
    if acceptable || !seen_range {
        return Ok(());
    }
    Err(Refusal::NotAcceptable {
        supported: accepted_major_versions
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Whether one media range (`type/subtype *(; name=value)`) is acceptable.
fn range_is_acceptable(range: &str, accepted: &[u64]) -> Result<bool, Refusal> {
    let mut parts = split_outside_quotes(range, b';');
    let media_type = parts.next().unwrap_or("").trim();
    let is_fhir = media_type.eq_ignore_ascii_case("application/fhir+json")
        || media_type.eq_ignore_ascii_case("application/fhir+xml");
    let is_generic = [
        "*/*",
        "application/*",
        "application/json",
        "application/xml",
    ]
    .iter()
    .any(|generic| media_type.eq_ignore_ascii_case(generic));
    let mut major = DEFAULT_MAJOR;
    let mut refused = false;
    for parameter in parts {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        let name = name.trim();
        let value = unquote(value.trim());
        if name.eq_ignore_ascii_case("q") {
            refused = is_zero_quality(value);
        } else if name.eq_ignore_ascii_case("version") && is_fhir {
            match parse_major(value) {
                Some(m) => major = m,
                None => refused = true,
            }
        }
    }
    if refused {
        return Ok(false);
    }
    Ok(is_generic || (is_fhir && accepted.contains(&major)))
}

/// The major of `X`, `X.Y` or `X.Y.Z` (decimal digits), optionally followed by a semver
/// pre-release (`-alpha`, `-beta.2`, `-rc1`) and build metadata (`+build.5`), or `None`.
fn parse_major(version: &str) -> Option<u64> {
    let (version, build) = match version.split_once('+') {
        Some((version, build)) => (version, Some(build)),
        None => (version, None),
    };
    let (core, pre_release) = match version.split_once('-') {
        Some((core, pre_release)) => (core, Some(pre_release)),
        None => (version, None),
    };
    let identifiers = |suffix: &str| {
        suffix
            .split('.')
            .all(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !pre_release.is_none_or(identifiers) || !build.is_none_or(identifiers) {
        return None;
    }
    let mut numbers = core.split('.');
    let major = numbers.next()?;
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(major) {
        return None;
    }
    let mut count = 1;
    for part in numbers {
        count += 1;
        if count > 3 || !all_digits(part) {
            return None;
        }
    }
    major.parse().ok()
}

/// The format of the gateway's own answers (DESIGN.md §5a): FHIR XML when the query's `_format`
/// names XML (it overrides `Accept`, as in FHIR's REST API), or when `Accept` prefers
/// `application/fhir+xml` (or `application/xml`, `text/xml`) over the JSON types, by weight and
/// then order; FHIR JSON otherwise, `*/*` and no `Accept` included.
pub fn response_format(headers: &HeaderMap, uri: &http::Uri) -> Format {
    if let Some(format) = uri.query().and_then(format_parameter) {
        return format;
    }
    // (weight, position) of the best XML and the best JSON range.
    let mut best: [Option<(f32, usize)>; 2] = [None, None];
    let mut position = 0;
    for value in headers.get_all(http::header::ACCEPT) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for range in split_ranges(strip_single_quotes(text.trim())) {
            position += 1;
            let mut parts = split_outside_quotes(strip_single_quotes(range.trim()), b';');
            // Compared without lower-casing a copy: this runs on every request.
            let media_type = parts.next().unwrap_or("").trim();
            let is = |types: &[&str]| types.iter().any(|t| media_type.eq_ignore_ascii_case(t));
            let slot = if is(&["application/fhir+xml", "application/xml", "text/xml"]) {
                0
            } else if is(&["application/fhir+json", "application/json"]) {
                1
            } else {
                continue;
            };
            let weight = parts
                .filter_map(|p| p.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, q)| unquote(q.trim()).parse().unwrap_or(0.0));
            if weight > 0.0 && best[slot].is_none_or(|(w, _)| weight > w) {
                best[slot] = Some((weight, position));
            }
        }
    }
    match best {
        [Some((xml, at_xml)), Some((json, at_json))]
            if xml > json || (xml == json && at_xml < at_json) =>
        {
            Format::Xml
        }
        [Some(_), None] => Format::Xml,
        _ => Format::Json,
    }
}

/// The `_format` query parameter's format, when it names one (`xml`, `json` or a media type,
/// perhaps percent-encoded: `application/fhir%2Bxml`).
fn format_parameter(query: &str) -> Option<Format> {
    let value = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "_format")?
        .1
        .to_ascii_lowercase();
    if value.ends_with("xml") {
        Some(Format::Xml)
    } else if value.ends_with("json") {
        Some(Format::Json)
    } else {
        None
    }
}

/// `q=0`, `q=0.0`, ... (RFC 9110 §12.4.2: weight 0 means "not acceptable").
fn is_zero_quality(weight: &str) -> bool {
    match weight.split_once('.') {
        Some((whole, fraction)) => whole == "0" && fraction.bytes().all(|b| b == b'0'),
        None => weight == "0",
    }
}

/// Splits at top-level commas (not inside a double-quoted parameter value).
fn split_ranges(text: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(text, b',')
}

/// Splits `text` at `separator` bytes that are outside RFC 9110 quoted strings.
fn split_outside_quotes(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        let bytes = current.as_bytes();
        let mut in_quotes = false;
        let mut escaped = false;
        for (i, &b) in bytes.iter().enumerate() {
            if in_quotes {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_quotes = false,
                    _ => {}
                }
            } else if b == b'"' {
                in_quotes = true;
            } else if b == separator {
                rest = Some(&current[i + 1..]);
                return Some(&current[..i]);
            }
        }
        rest = None;
        Some(current)
    })
}

/// Removes one pair of single quotes wrapping `text` (see the module comment). A value with quotes
/// inside (`'a', 'b'`) is left for the per-range pass.
fn strip_single_quotes(text: &str) -> &str {
    text.strip_prefix('\'')
        .and_then(|inner| inner.strip_suffix('\''))
        .filter(|inner| !inner.contains('\''))
        .unwrap_or(text)
}

/// Removes one pair of double or single quotes wrapping a parameter value.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or_else(|| strip_single_quotes(value))
        .trim()
}

fn malformed(problem: &str) -> Refusal {
    Refusal::malformed(ACCEPT, problem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const FIXTURE: &str = include_str!("../../tests/fixtures/bars-examples/headers-examples.json");

    fn accept(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(http::header::ACCEPT, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn check(value: &str) -> Result<(), Refusal> {
        check_accept(&accept(&[value]), &[1])
    }

    fn assert_not_acceptable(result: Result<(), Refusal>, supported: &str) {
        let refusal = result.expect_err("should be refused");
        assert_eq!(
            refusal,
            Refusal::NotAcceptable {
                supported: supported.into()
            }
        );
        assert_eq!(refusal.status(), 406);
        assert_eq!(refusal.bars_code(), "REC_NOT_ACCEPTABLE");
        assert_eq!(refusal.issue_code(), "processing");
    }

    fn assert_malformed(result: Result<(), Refusal>) {
        let refusal = result.expect_err("should be refused");
        assert!(
            matches!(
                refusal,
                Refusal::MalformedHeader {
                    header: "Accept",
                    ..
                }
            ),
            "{refusal:?}"
        );
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.issue_code(), "value");
        assert!(
            refusal.to_string().starts_with("Accept header"),
            "{refusal}"
        );
    }

    #[test]
    fn missing_accept_is_acceptable() {
        assert_eq!(check_accept(&HeaderMap::new(), &[1]), Ok(()));
    }

    #[test]
    fn spec_examples_are_acceptable() {
        let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let examples = [
            fixture["valid_process_message_request"]["headers"]["Accept"]
                .as_str()
                .unwrap(),
            fixture["other_observed_values"]["Accept_v1.0.0_example"]
                .as_str()
                .unwrap(),
            fixture["other_observed_values"]["Accept_v1.3.0_example"]
                .as_str()
                .unwrap(),
        ];
        assert!(
            examples[1].starts_with('\''),
            "the quoted example is still quoted"
        );
        for example in examples {
            assert_eq!(check(example), Ok(()), "{example}");
        }
    }

    #[test]
    fn spelling_variants_of_a_supported_version_are_acceptable() {
        for value in [
            "application/fhir+json;version=1.4.0",
            "application/fhir+json ; version = 1.4.0",
            "APPLICATION/FHIR+JSON; VERSION=1.0.0",
            "application/fhir+json; version=\"1.0.0\"",
            "application/fhir+json; version='1.0.0'",
            "application/fhir+xml; version=1.2.0",
            "application/fhir+json; version=1",
            "application/fhir+json; version=1.5",
            "application/fhir+json",
            "application/fhir+json; fhirVersion=4.0; charset=utf-8",
            "application/fhir+json; q=0.9; version=1.0.0",
            "'application/fhir+json; version=1.0.0', 'application/fhir+xml; version=1.0.0'",
            "",
            " , ",
        ] {
            assert_eq!(check(value), Ok(()), "{value:?}");
        }
    }

    #[test]
    fn generic_ranges_are_acceptable() {
        for value in [
            "*/*",
            "application/json",
            "application/xml",
            "application/*",
            "Application/JSON; charset=utf-8",
        ] {
            assert_eq!(check(value), Ok(()), "{value}");
        }
    }

    #[test]
    fn unsupported_major_gets_406() {
        assert_not_acceptable(check("application/fhir+json; version=2.0.0"), "1");
        assert_not_acceptable(check("application/fhir+xml; version=0.9.0"), "1");
        assert_not_acceptable(
            check_accept(&accept(&["application/fhir+json; version=3.0.0"]), &[1, 2]),
            "1, 2",
        );
        // No version means 1.0.0, which a receiver serving only 2 does not serve.
        assert_not_acceptable(check_accept(&accept(&["application/fhir+json"]), &[2]), "2");
    }

    #[test]
    fn one_acceptable_range_among_many_is_enough() {
        assert_eq!(
            check("application/fhir+json; version=2.0.0, application/fhir+json; version=1.4.0"),
            Ok(())
        );
        assert_eq!(
            check("application/fhir+json; version=2.0.0, */*;q=0.1"),
            Ok(())
        );
        assert_eq!(
            check_accept(
                &accept(&[
                    "application/fhir+json; version=2.0.0",
                    "application/fhir+xml; version=1.0.0"
                ]),
                &[1]
            ),
            Ok(())
        );
        assert_eq!(
            check_accept(&accept(&["application/fhir+json; version=2.0.0"]), &[1, 2]),
            Ok(())
        );
    }

    #[test]
    fn every_range_unsupported_gets_406() {
        assert_not_acceptable(
            check("application/fhir+json; version=2.0.0, application/fhir+xml; version=3.1.0"),
            "1",
        );
        assert_not_acceptable(check("text/html"), "1");
        assert_not_acceptable(check("text/html, image/png"), "1");
    }

    #[test]
    fn ranges_with_zero_quality_do_not_count() {
        assert_not_acceptable(check("application/fhir+json; version=1.0.0; q=0"), "1");
        assert_not_acceptable(
            check("*/*;q=0.000, application/fhir+json; version=2.0.0"),
            "1",
        );
        assert_eq!(
            check("application/fhir+json; version=1.0.0; q=0.001"),
            Ok(())
        );
    }

    #[test]
    fn version_that_cannot_be_read_gets_406_not_400() {
        for value in [
            "application/fhir+json; version=abc",
            "application/fhir+json; version=",
            "application/fhir+json; version=1.x.0",
            "application/fhir+json; version=v1.0.0",
            "application/fhir+json; version=1..0",
            "application/fhir+json; version=1.0.0.0",
            "application/fhir+json; version=1.0.0-",
            "application/fhir+json; version=1.0.0-beta..1",
            "application/fhir+json; version=1.0.0-be_ta",
            "application/fhir+json; version=1.0.0+",
            "application/fhir+json; version=-1",
            "application/fhir+json; version=99999999999999999999999.0.0",
        ] {
            assert_not_acceptable(check(value), "1");
        }
        // Another range that can be served still serves.
        assert_eq!(check("*/*, application/fhir+json; version=one"), Ok(()));
    }

    #[test]
    fn pre_release_versions_are_matched_by_major() {
        for value in [
            "application/fhir+json; version=1.4.0-alpha",
            "application/fhir+json; version=1.4.0-beta.2",
            "application/fhir+json; version=1.0.0-rc1",
            "application/fhir+json; version=1.2.0-rc.1+build.5",
            "application/fhir+xml; version=1.4.0-alpha",
            "application/fhir+json; version=\"1.4.0-alpha\"",
        ] {
            assert_eq!(check(value), Ok(()), "{value}");
        }
        assert_not_acceptable(check("application/fhir+json; version=2.0.0-alpha"), "1");
    }

    fn format_of(accept_values: &[&str], uri: &str) -> Format {
        response_format(&accept(accept_values), &uri.parse().unwrap())
    }

    #[test]
    fn xml_is_answered_when_the_caller_prefers_it() {
        for (values, uri) in [
            (&["application/fhir+xml"][..], "/metadata"),
            (&["application/fhir+xml; version=1.0.0"], "/metadata"),
            (&["'application/fhir+xml; version=1.0.0'"], "/metadata"),
            (&["application/xml"], "/"),
            (&["text/xml, application/fhir+json;q=0.5"], "/"),
            (
                &["application/fhir+json;q=0.5", "application/fhir+xml"],
                "/",
            ),
            (&["application/fhir+xml, application/fhir+json"], "/"),
            (&["*/*, application/fhir+xml"], "/"),
            (&[], "/Slot?_format=xml"),
            (
                &["application/fhir+json"],
                "/Slot?a=1&_format=application/fhir%2Bxml",
            ),
            (&[], "/Slot?_format=text/xml"),
        ] {
            assert_eq!(format_of(values, uri), Format::Xml, "{values:?} {uri}");
        }
    }

    #[test]
    fn json_is_answered_otherwise() {
        for (values, uri) in [
            (&[][..], "/metadata"),
            (&["*/*"], "/"),
            (&["application/fhir+json; version=1.0.0"], "/"),
            (&["application/fhir+json, application/fhir+xml"], "/"),
            (&["application/fhir+xml;q=0.5, application/json"], "/"),
            (&["application/fhir+xml;q=0"], "/"),
            (&["text/html"], "/"),
            (&["application/fhir+xml"], "/Slot?_format=json"),
            (&[], "/Slot?_format=html"),
        ] {
            assert_eq!(format_of(values, uri), Format::Json, "{values:?} {uri}");
        }
    }

    #[test]
    fn version_on_non_fhir_ranges_is_ignored() {
        assert_eq!(check("application/json; version=whatever"), Ok(()));
    }

    #[test]
    fn non_ascii_accept_is_malformed() {
        let mut map = HeaderMap::new();
        map.insert(
            http::header::ACCEPT,
            HeaderValue::from_bytes(b"application/fhir+json\xff").unwrap(),
        );
        assert_malformed(check_accept(&map, &[1]));
    }

    #[test]
    fn commas_inside_quoted_parameters_do_not_split_ranges() {
        assert_eq!(
            check("application/fhir+json; profile=\"a,b\"; version=1.0.0"),
            Ok(())
        );
        assert_not_acceptable(check("text/html; x=\"a, application/json\""), "1");
    }

    #[test]
    fn major_is_parsed_from_version_forms() {
        assert_eq!(parse_major("1.4.0"), Some(1));
        assert_eq!(parse_major("12"), Some(12));
        assert_eq!(parse_major("2.0"), Some(2));
        assert_eq!(parse_major("1.4.0.1"), None);
        assert_eq!(parse_major("1.4.0-alpha"), Some(1));
        assert_eq!(parse_major("3.0.0-rc.1+20261201"), Some(3));
        assert_eq!(parse_major("1-alpha"), Some(1));
        assert_eq!(parse_major(" 1"), None);
    }
}
