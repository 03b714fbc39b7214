//! HTTP/1.1 request framing that hyper accepts and the gateway refuses: a request with both
//! `Content-Length` and `Transfer-Encoding`. RFC 9112 §6.1 says such a message "ought to be
//! handled as an error"; hyper reads it as chunked, drops the `Content-Length` before the service
//! sees the request, and closes the connection afterwards. The BaRS proxy never sends both, and
//! nginx answers 400: so does the gateway (with the ids echoed, as an OperationOutcome).
//!
//! Because hyper hides the header, the connection's bytes are watched as they are read: a small
//! tracker follows the message boundaries (heads, `Content-Length` and chunked bodies) and notes,
//! for each request head in order, whether it carried both. The pipeline asks once per HTTP/1
//! request. When the tracker cannot follow the stream (anything hyper itself would refuse or turn
//! into an upgrade), it stops and flags nothing more: the fallback is hyper's own handling.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Longest request head followed; beyond it hyper refuses the request anyway.
const MAX_HEAD: usize = 128 * 1024;

/// Shared between a connection's IO (which feeds it) and its requests (which ask).
#[derive(Debug, Default)]
pub(crate) struct FramingWatch {
    inner: Mutex<Tracker>,
}

impl FramingWatch {
    /// Follows bytes as they arrive from the client.
    pub(crate) fn feed(&self, bytes: &[u8]) {
        self.lock().feed(bytes);
    }

    /// Whether the next request, in order, carried both `Content-Length` and `Transfer-Encoding`.
    pub(crate) fn next_request_has_both_lengths(&self) -> bool {
        self.lock().flags.pop_front().unwrap_or(false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        // A panic under the lock leaves a tracker that at worst flags nothing.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
enum State {
    /// Reading a request head (the bytes so far).
    #[default]
    Head,
    /// Skipping a `Content-Length` body: bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data: bytes left.
    ChunkData(u64),
    /// Skipping the line end after chunk data.
    ChunkEnd,
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// Cannot follow the stream any more.
    Lost,
}

#[derive(Debug, Default)]
struct Tracker {
    state: State,
    /// The current head or line, as far as it has arrived.
    line: Vec<u8>,
    /// One entry per request head seen, in order.
    flags: VecDeque<bool>,
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    if self.line.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    if self.line.is_empty() {
                        // The usual case: the whole head arrived in one read. Read it in place.
                        if let Some(end) = head_end(bytes, 0) {
                            self.state = self.after_head(&bytes[..end]);
                            bytes = &bytes[end..];
                            continue;
                        }
                    }
                    let before = self.line.len();
                    self.line.extend_from_slice(bytes);
                    let Some(end) = head_end(&self.line, before.saturating_sub(3)) else {
                        bytes = &[];
                        if self.line.len() > MAX_HEAD {
                            self.state = State::Lost;
                        }
                        continue;
                    };
                    // What follows the head is fed on in the new state.
                    bytes = &bytes[end - before..];
                    self.line.truncate(end);
                    let mut head = std::mem::take(&mut self.line);
                    self.state = self.after_head(&head);
                    // The buffer is kept for the next head: no allocation per request.
                    head.clear();
                    self.line = head;
                }
                State::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(nl) = memchr::memchr(b'\n', bytes) else {
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > MAX_HEAD {
                            self.state = State::Lost;
                        }
                        return;
                    };
                    self.line.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        State::ChunkSize => match chunk_size(line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Lost,
                        },
                        State::ChunkEnd if line.is_empty() => State::ChunkSize,
                        State::Trailers if line.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        _ => State::Lost,
                    };
                }
            }
        }
    }

    /// Notes the head's flag and says how its body is framed.
    fn after_head(&mut self, head: &[u8]) -> State {
        let mut content_length = None;
        let mut lengths = 0;
        let mut transfer_encoding = None;
        for line in head.split(|b| *b == b'\n').skip(1) {
            // Only the two framing headers matter: look at a line's name by its length first,
            // and decode a value only for them.
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = &line[..colon];
            if name.len() != b"content-length".len() && name.len() != b"transfer-encoding".len() {
                continue;
            }
            let value = line[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                content_length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                transfer_encoding = Some(String::from_utf8_lossy(value).to_ascii_lowercase());
            }
        }
        let both = lengths > 0 && transfer_encoding.is_some();
        self.flags.push_back(both);
        match (transfer_encoding, content_length) {
            // hyper closes the connection after such a request: nothing more to follow.
            _ if both => State::Lost,
            (Some(te), _) if te.rsplit(',').next().map(str::trim) == Some("chunked") => {
                State::ChunkSize
            }
            (Some(_), _) => State::Lost,
            (None, Some(0)) => State::Head,
            (None, Some(n)) if lengths == 1 => State::Body(n),
            (None, None) if lengths == 0 => State::Head,
            _ => State::Lost,
        }
    }
}

/// Where the head in `buf` ends (after its blank line: CRLF CRLF, or bare LF LF as hyper also
/// accepts), searching from `from`. Searches line ends, not every byte.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    for nl in memchr::memchr_iter(b'\n', &buf[from..]).map(|i| from + i) {
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => {}
        }
    }
    None
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_of(wire: &[u8], piece: usize) -> Vec<bool> {
        let watch = FramingWatch::default();
        for chunk in wire.chunks(piece.max(1)) {
            watch.feed(chunk);
        }
        let mut out = Vec::new();
        let tracker = watch.lock();
        out.extend(tracker.flags.iter().copied());
        out
    }

    const PLAIN: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    const CHUNKED: &[u8] =
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: t\r\n\r\n";
    const GET: &[u8] = b"\r\nGET /metadata HTTP/1.1\r\nHost: x\r\n\r\n";
    const BOTH: &[u8] =
        b"POST /c HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn keep_alive_requests_are_followed_in_order_whatever_the_read_sizes() {
        let mut wire = Vec::new();
        for part in [PLAIN, CHUNKED, GET, BOTH, GET] {
            wire.extend_from_slice(part);
        }
        for piece in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                flags_of(&wire, piece),
                vec![false, false, false, true],
                "read {piece} bytes at a time (nothing followed after both lengths)"
            );
        }
    }

    #[test]
    fn the_order_of_the_two_headers_does_not_matter() {
        let te_first =
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n";
        assert_eq!(flags_of(te_first, 4096), vec![true]);
        assert_eq!(flags_of(BOTH, 5), vec![true]);
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_one() {
        let hidden = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut wire = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            hidden.len()
        )
        .into_bytes();
        wire.extend_from_slice(hidden);
        wire.extend_from_slice(GET);
        let flags = flags_of(&wire, 4096);
        assert_eq!(
            flags,
            vec![false, false],
            "the POST and the GET; the body is no head"
        );
    }

    #[test]
    fn heads_ended_by_bare_or_mixed_line_ends_are_found_whatever_the_read_sizes() {
        // Bare LF throughout, and a CRLF blank line after a bare-LF header line.
        let bare = b"POST /a HTTP/1.1\nContent-Length: 2\nTransfer-Encoding: chunked\n\n0\r\n\r\n";
        let mixed = b"GET /m HTTP/1.1\nHost: x\n\r\nGET /n HTTP/1.1\r\nHost: x\r\n\r\n";
        for piece in [1, 2, 3, 4096] {
            assert_eq!(
                flags_of(bare, piece),
                vec![true],
                "bare LF, {piece} at a time"
            );
            assert_eq!(
                flags_of(mixed, piece),
                vec![false, false],
                "mixed, {piece} at a time"
            );
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nrest", 0), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
    }

    #[test]
    fn a_stream_it_cannot_follow_flags_nothing_more() {
        let wire = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n";
        assert_eq!(flags_of(wire, 4096), vec![false]);
        let watch = FramingWatch::default();
        watch.feed(wire);
        watch.feed(BOTH);
        assert!(!watch.next_request_has_both_lengths());
        assert!(!watch.next_request_has_both_lengths());
    }
}
