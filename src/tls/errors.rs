//! Sorting a failed TLS handshake into the `reason` label of
//! `bars_gateway_tls_handshake_failures_total` (DESIGN.md §6).

/// The metric reason for a handshake that failed with `e` (what `tokio_rustls` returns): the
/// rustls error inside it when there is one, else `"io"` (the peer closed or reset).
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls_err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls_err {
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) => "invalid_message",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::handshake_failure_reason;
    use rustls::{CertificateError, Error, InvalidMessage, PeerIncompatible};
    use std::io;

    fn wrapped(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn rustls_errors_are_sorted_into_their_reasons() {
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "bad_certificate",
            ),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "bad_certificate",
            ),
            (Error::NoCertificatesPresented, "no_client_certificate"),
            (
                Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
                "incompatible",
            ),
            (
                Error::InvalidMessage(InvalidMessage::InvalidContentType),
                "invalid_message",
            ),
            (Error::DecryptError, "other"),
        ];
        for (error, reason) in cases {
            let label = format!("{error:?}");
            assert_eq!(handshake_failure_reason(&wrapped(error)), reason, "{label}");
        }
    }

    #[test]
    fn errors_without_a_rustls_cause_are_io() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(handshake_failure_reason(&reset), "io");
        let other = io::Error::other("not a TLS error");
        assert_eq!(handshake_failure_reason(&other), "io");
    }
}
