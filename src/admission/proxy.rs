//! PROXY protocol v1/v2 (HAProxy spec): reads exactly one header off the stream and not one byte
//! more (the TLS ClientHello follows), then lets `ppp` parse it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::AdmissionError;

/// The 12-byte signature every PROXY protocol v2 header starts with.
pub(super) const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What every PROXY protocol v1 header starts with.
pub(super) const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Bytes read before deciding between v1 and v2: both prefixes are at least this long.
pub(super) const SNIFF_LEN: usize = 6;
/// The shortest valid v1 header is `PROXY UNKNOWN\r\n`; reading this many bytes up front can only
/// overshoot a header that is invalid anyway.
pub(super) const V1_MIN_LEN: usize = 15;
/// The v1 specification's upper bound, CRLF included.
pub(super) const V1_MAX_LEN: usize = 107;
/// Signature, version/command, family/protocol and the 2-byte length.
pub(super) const V2_FIXED_LEN: usize = 16;
/// Largest v2 address + TLV block accepted. IPv6 addresses take 36 bytes and balancers add a few
/// small TLVs (AWS VPC endpoint id, GCP PSC id, HAProxy unique id), so 1 KiB is generous; the
/// 16-bit length field would otherwise let a peer make us buffer 64 KiB per connection.
pub const V2_MAX_PAYLOAD: usize = 1024;
/// First byte of a TLS handshake record (a ClientHello).
pub(super) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer relays a client connection from `source`.
    Proxied {
        /// The client address and port as the balancer saw them.
        source: SocketAddr,
    },
    /// The balancer speaks for itself (v2 LOCAL, v1 UNKNOWN, v2 AF_UNSPEC), e.g. a health check.
    Local,
}

/// Whether the first bytes are consistent with a PROXY v1 or v2 signature.
///
/// Judged on whatever one peek returned, possibly a single byte: waiting for more would mean a
/// polling loop (peek does not clear readiness), and a stream starting with `P` or `\r` is not a
/// TLS handshake (always 0x16) so it fails the handshake anyway; only the log reason is at stake.
pub(super) fn starts_like_proxy_header(bytes: &[u8]) -> bool {
    if bytes.first() == Some(&TLS_HANDSHAKE_RECORD) {
        return false;
    }
    let v1 = bytes.len().min(V1_PREFIX.len());
    let v2 = bytes.len().min(V2_SIGNATURE.len());
    !bytes.is_empty() && (bytes[..v1] == V1_PREFIX[..v1] || bytes[..v2] == V2_SIGNATURE[..v2])
}

/// [`read_proxy_header`] with one deadline over the whole header, so a slow-drip peer cannot hold
/// the connection open byte by byte.
pub(super) async fn read_proxy_header_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: Duration,
) -> Result<ProxyHeader, AdmissionError> {
    tokio::time::timeout(limit, read_proxy_header(reader))
        .await
        .map_err(|_| AdmissionError::ProxyHeaderTimeout)?
}

/// Reads exactly one PROXY v1 or v2 header and not one byte more (the TLS ClientHello follows on the
/// same stream). Generic so it can be tested on in-memory streams.
///
/// It has no deadline of its own (admit_peer puts one over the whole header). It never reads past
/// the header: v1 in chunks no longer than the shortest possible rest of a valid header (about 20
/// small reads for a TCP4 line, negligible at the BaRS proxy's connection rate and simpler than
/// any buffering scheme), v2 in three exact reads driven by its length field.
pub async fn read_proxy_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ProxyHeader, AdmissionError> {
    let mut buf = [0u8; V2_FIXED_LEN + V2_MAX_PAYLOAD];
    let got = read_until_full_or_eof(reader, &mut buf[..SNIFF_LEN]).await?;
    let start = &buf[..got];
    if start == V1_PREFIX {
        read_v1_rest(reader, &mut buf[..V1_MAX_LEN]).await
    } else if start == &V2_SIGNATURE[..SNIFF_LEN] {
        read_v2_rest(reader, &mut buf).await
    } else if !start.is_empty() && (V1_PREFIX.starts_with(start) || V2_SIGNATURE.starts_with(start))
    {
        Err(truncated(got))
    } else if start.is_empty() {
        // A plain TCP health check (connect, close) or a client giving up: nothing to say about
        // the balancer's configuration, so the same quiet `io` refusal as a silent direct peer.
        Err(closed_before_any_byte())
    } else {
        // A TLS ClientHello (0x16...) or anything else that is not a PROXY header.
        Err(AdmissionError::ProxyHeaderMissing)
    }
}

/// Reads the rest of a v1 header whose first [`SNIFF_LEN`] bytes are already in `buf`.
pub(super) async fn read_v1_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<ProxyHeader, AdmissionError> {
    let mut len = SNIFF_LEN;
    read_exact_or_truncated(reader, buf, len, V1_MIN_LEN).await?;
    len = V1_MIN_LEN;
    loop {
        check_v1_bytes(&buf[..len])?;
        if buf[..len].ends_with(b"\r\n") {
            break;
        }
        // Shortest possible rest of a valid header: "\n" after a '\r', else at least "\r\n".
        let need = if buf[len - 1] == b'\r' { 1 } else { 2 };
        if len + need > V1_MAX_LEN {
            return Err(AdmissionError::ProxyHeaderMalformed(format!(
                "v1 header has no CRLF within {V1_MAX_LEN} bytes"
            )));
        }
        read_exact_or_truncated(reader, buf, len, len + need).await?;
        len += need;
    }
    let header = ppp::v1::Header::try_from(&buf[..len])
        .map_err(|error| AdmissionError::ProxyHeaderMalformed(format!("v1: {error}")))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        },
        ppp::v1::Addresses::Tcp6(a) => ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        },
        ppp::v1::Addresses::Unknown => ProxyHeader::Local,
    })
}

/// A v1 header is printable ASCII ending in CRLF; refusing anything else early stops a peer from
/// feeding binary garbage until the 107-byte limit.
pub(super) fn check_v1_bytes(bytes: &[u8]) -> Result<(), AdmissionError> {
    let last = bytes.len().saturating_sub(1);
    for (offset, &byte) in bytes.iter().enumerate() {
        let fine = match byte {
            b'\r' => offset == last || (offset + 1 == last && bytes[last] == b'\n'),
            b'\n' => offset == last && offset > 0 && bytes[offset - 1] == b'\r',
            _ => byte == b' ' || byte.is_ascii_graphic(),
        };
        if !fine {
            return Err(AdmissionError::ProxyHeaderMalformed(format!(
                "v1 header has unexpected byte {byte:#04x} at offset {offset}"
            )));
        }
    }
    Ok(())
}

/// Reads the rest of a v2 header whose first [`SNIFF_LEN`] bytes are already in `buf`.
pub(super) async fn read_v2_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8; V2_FIXED_LEN + V2_MAX_PAYLOAD],
) -> Result<ProxyHeader, AdmissionError> {
    read_exact_or_truncated(reader, buf, SNIFF_LEN, V2_FIXED_LEN).await?;
    if buf[..V2_SIGNATURE.len()] != V2_SIGNATURE[..] {
        return Err(AdmissionError::ProxyHeaderMalformed(
            "v2 signature is incomplete".into(),
        ));
    }
    // ppp checks the fixed part (version, command, family, protocol) and reports how many bytes
    // of addresses and TLVs it announces; a bad fixed part is refused before any more is read.
    let payload = match ppp::v2::Header::try_from(&buf[..V2_FIXED_LEN]) {
        Ok(_) => 0,
        Err(ppp::v2::ParseError::Partial(_, announced)) => announced,
        Err(error) => return Err(AdmissionError::ProxyHeaderMalformed(format!("v2: {error}"))),
    };
    if payload > V2_MAX_PAYLOAD {
        return Err(AdmissionError::ProxyHeaderMalformed(format!(
            "v2 header announces {payload} bytes of addresses and TLVs; more than {V2_MAX_PAYLOAD} is refused"
        )));
    }
    let total = V2_FIXED_LEN + payload;
    read_exact_or_truncated(reader, buf, V2_FIXED_LEN, total).await?;
    // TLVs are not validated: none is used here, and the length field already bounds the header.
    let header = ppp::v2::Header::try_from(&buf[..total])
        .map_err(|error| AdmissionError::ProxyHeaderMalformed(format!("v2: {error}")))?;
    if header.command == ppp::v2::Command::Local {
        // The specification tells receivers to ignore the addresses of a LOCAL connection.
        return Ok(ProxyHeader::Local);
    }
    if header.protocol == ppp::v2::Protocol::Datagram {
        return Err(AdmissionError::ProxyHeaderMalformed(
            "v2 header describes a UDP flow on a TCP listener".into(),
        ));
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Ok(ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        }),
        ppp::v2::Addresses::IPv6(a) => Ok(ProxyHeader::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
        }),
        // "the receiver must ignore the address information" for AF_UNSPEC: same as LOCAL.
        ppp::v2::Addresses::Unspecified => Ok(ProxyHeader::Local),
        ppp::v2::Addresses::Unix(_) => Err(AdmissionError::ProxyHeaderMalformed(
            "v2 header carries AF_UNIX addresses, which client.allowed_ips cannot check".into(),
        )),
    }
}

/// Fills `buf[from..to]` or reports a truncated header (the peer closed mid-header).
pub(super) async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    from: usize,
    to: usize,
) -> Result<(), AdmissionError> {
    let got = read_until_full_or_eof(reader, &mut buf[from..to]).await?;
    if got < to - from {
        return Err(truncated(from + got));
    }
    Ok(())
}

/// Reads until `buf` is full or the peer closes; returns the bytes read.
pub(super) async fn read_until_full_or_eof<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, AdmissionError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(AdmissionError::Io(error)),
        }
    }
    Ok(filled)
}

/// The peer closed the connection without sending anything.
pub(super) fn closed_before_any_byte() -> AdmissionError {
    AdmissionError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "peer closed the connection before sending any byte",
    ))
}

/// The peer closed the connection partway through a header.
pub(super) fn truncated(bytes: usize) -> AdmissionError {
    AdmissionError::ProxyHeaderMalformed(format!(
        "truncated: the connection closed after {bytes} bytes of the header"
    ))
}
