//! The header-section size rule: a request whose request line and header fields, as HTTP/1.1
//! would write them, exceed `listen.max_header_bytes` is refused with 431 (`HeadersTooLarge`), as
//! a BaRS OperationOutcome. Checked after the ids (so the refusal echoes them) and before the
//! route. Beyond the limit plus hyper's slack, hyper answers 431 itself (`src/gateway.rs`).

use http::Request;

use crate::bars::errors::Refusal;

/// Refuses a request whose header section (request line and fields, as HTTP/1.1 would write
/// them) is larger than `limit`.
pub fn check_header_section<B>(request: &Request<B>, limit: usize) -> Result<(), Refusal> {
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + 12;
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if line + fields > limit {
        return Err(Refusal::HeadersTooLarge { limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /a HTTP/1.1\r\n` (17 bytes) and `x-b: cd\r\n` (9 bytes): 26 bytes in all.
    fn request() -> Request<()> {
        Request::get("/a").header("x-b", "cd").body(()).unwrap()
    }

    #[test]
    fn a_header_section_of_exactly_the_limit_passes() {
        assert_eq!(check_header_section(&request(), 26), Ok(()));
    }

    #[test]
    fn one_byte_over_the_limit_is_431_naming_the_limit() {
        let refusal = check_header_section(&request(), 25).unwrap_err();
        assert_eq!(refusal, Refusal::HeadersTooLarge { limit: 25 });
        assert_eq!(
            refusal.outcome().status,
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
