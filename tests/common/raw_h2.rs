//! A raw h2 client (RFC 9113) over [`Reader`]: frames written and read by hand, request header
//! blocks as HPACK literals without indexing or Huffman, and just enough HPACK decoding to read a
//! response's `:status`, so malformed requests a real h2 client refuses to send can be sent.

use tokio::io::AsyncWriteExt;

use super::raw_http::{new_id, open_with, Reader, Tls, SAFETY_NET};
use super::{example_headers, ClientCert, Rig};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// How one h2 stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum H2Outcome {
    /// Response headers; the status when the HPACK block names it statically or literally.
    Status(Option<u16>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended.
    Closed,
}

impl H2Outcome {
    pub fn assert_refused(&self, case: &str) {
        match self {
            H2Outcome::Status(Some(status)) if (400..500).contains(status) => {}
            H2Outcome::Reset(_) | H2Outcome::GoAway(_) | H2Outcome::Closed => {}
            other => panic!("{case}: expected a 4xx, a reset or a close, got {other:?}"),
        }
    }
}

/// An h2 client speaking frames by hand (RFC 9113), HPACK literals without indexing or Huffman.
pub struct H2 {
    pub conn: Reader<Tls>,
    pub settings: Vec<(u16, u32)>,
}

impl H2 {
    /// Connects with ALPN h2, exchanges prefaces and acknowledges the server's SETTINGS (from then
    /// on they are in force on the server side too).
    pub async fn open(rig: &Rig) -> H2 {
        let config = rig.pki.client_config_with(
            Some(ClientCert::Proxy),
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            vec![b"h2".to_vec()],
        );
        let conn = open_with(rig, config).await;
        assert_eq!(conn.io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut h2 = H2 {
            conn,
            settings: Vec::new(),
        };
        h2.conn.io.write_all(PREFACE).await.unwrap();
        h2.send(SETTINGS, 0, 0, &[]).await;
        loop {
            let frame = h2.frame().await.expect("server SETTINGS");
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                h2.settings = frame
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                break;
            }
        }
        h2.send(SETTINGS, ACK, 0, &[]).await;
        h2
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        let _ = self.conn.io.write_all(&frame).await;
    }

    /// Sends a header block, split into HEADERS + CONTINUATION frames of at most 16 KiB.
    pub async fn send_headers(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = if i + 1 == pieces.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                let end = if end_stream { END_STREAM } else { 0 };
                self.send(HEADERS, last | end, stream, piece).await;
            } else {
                self.send(CONTINUATION, last, stream, piece).await;
            }
        }
    }

    /// The next frame; `None` when the connection ends.
    pub async fn frame(&mut self) -> Option<Frame> {
        let read = async {
            self.conn.fill_to(9).await.ok()?;
            let len = u32::from_be_bytes([0, self.conn.buf[0], self.conn.buf[1], self.conn.buf[2]])
                as usize;
            self.conn.fill_to(9 + len).await.ok()?;
            let header: Vec<u8> = self.conn.buf.drain(..9).collect();
            let payload = self.conn.buf.drain(..len).collect();
            Some(Frame {
                kind: header[3],
                flags: header[4],
                stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                    & 0x7fff_ffff,
                payload,
            })
        };
        tokio::time::timeout(SAFETY_NET, read)
            .await
            .expect("the gateway answers or closes")
    }

    /// Reads until stream `id` gets response headers or a reset, or the connection ends.
    pub async fn outcome(&mut self, id: u32) -> H2Outcome {
        loop {
            let Some(frame) = self.frame().await else {
                return H2Outcome::Closed;
            };
            let code = || u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
            match frame.kind {
                HEADERS if frame.stream == id => {
                    return H2Outcome::Status(decode_status(&frame.payload))
                }
                RST_STREAM if frame.stream == id => return H2Outcome::Reset(code()),
                GOAWAY => {
                    return H2Outcome::GoAway(u32::from_be_bytes(
                        frame.payload[4..8].try_into().unwrap(),
                    ))
                }
                _ => {}
            }
        }
    }
}

pub fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
pub fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 7, value.len());
    out.extend_from_slice(value);
}

/// A header field as raw bytes: name, value.
pub type Field<'a> = (&'a [u8], &'a [u8]);

/// A request header block: pseudo-headers, the BaRS example headers (fresh id), then `extra`.
pub fn h2_block(method: &str, path: &str, extra: &[Field]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", method),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
    ] {
        hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
    }
    for (name, value) in example_headers().as_object().unwrap() {
        let value = if name == "X-Request-Id" {
            new_id()
        } else {
            value.as_str().unwrap().to_string()
        };
        hpack_literal(
            &mut block,
            name.to_ascii_lowercase().as_bytes(),
            value.as_bytes(),
        );
    }
    for (name, value) in extra {
        hpack_literal(&mut block, name, value);
    }
    block
}

/// The `:status` at the start of a response header block, when it is a static-table entry or a
/// literal (plain or Huffman-coded digits) with the static `:status` name; `None` otherwise.
pub fn decode_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return [200, 204, 206, 304, 400, 404, 500]
            .get(usize::from(first & 0x7f).checked_sub(8)?)
            .copied();
    }
    let name_index = if first & 0xc0 == 0x40 {
        first & 0x3f
    } else if first & 0xe0 == 0x00 {
        first & 0x0f
    } else {
        return None;
    };
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let (huffman, len) = (block[1] & 0x80 != 0, usize::from(block[1] & 0x7f));
    let bytes = block.get(2..2 + len)?;
    let digits = if huffman {
        huffman_digits(bytes)?
    } else {
        String::from_utf8(bytes.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// Decodes a Huffman string made only of digits (RFC 7541 Appendix B: `0`-`2` are 5-bit codes
/// 0-2, `3`-`9` 6-bit codes 0x19-0x1f), then EOS padding.
pub fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |v, b| v << 1 | b);
    let (mut pos, mut out) = (0, String::new());
    while pos < bits.len() {
        let rest = bits.len() - pos;
        if rest >= 5 && value(pos, 5) <= 2 {
            out.push(char::from(b'0' + value(pos, 5)));
            pos += 5;
        } else if rest >= 6 && (0x19..=0x1f).contains(&value(pos, 6)) {
            out.push(char::from(b'3' + value(pos, 6) - 0x19));
            pos += 6;
        } else if rest < 8 && bits[pos..].iter().all(|b| *b == 1) {
            break;
        } else {
            return None;
        }
    }
    Some(out)
}
