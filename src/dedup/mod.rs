//! Retry deduplication by X-Request-Id (DESIGN.md §5; BaRS IG "Transactional integrity").
//!
//! A request id is claimed *in flight* before the request is forwarded ("stored ahead of the
//! message being processed but after any access control"), then recorded *done* with the
//! upstream's status when the answer is deterministic (2xx, or a 4xx other than 408/425/429), or
//! forgotten when it is transient (408, 429, 5xx, timeout, unreachable) so the sender's retry
//! goes through. A retry of a done request gets 409 (or the original 4xx again), a retry while
//! the original is in flight gets 425, and the same id with other content gets 422.

pub mod memory;
pub mod redis;

use std::time::Duration;

use http::header::HeaderMap;
use http::{Method, Uri};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bars::ids::RequestId;
use crate::config::{DedupBackend, DedupSettings};

/// SHA-256 over everything that makes two requests "the same message" (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(#[serde(with = "hex_bytes")] pub [u8; 32]);

/// The headers the fingerprint covers besides the correlation id (the access token is excluded:
/// a retry may carry a fresh one).
const FINGERPRINT_HEADERS: [&str; 6] = [
    "x-correlation-id",
    "nhsd-target-identifier",
    "nhsd-end-user-organisation",
    "nhsd-requesting-software",
    "nhsd-requesting-practitioner",
    "content-type",
];

impl Fingerprint {
    /// Fingerprints method, path and query, the listed headers and the body. Every field is
    /// length-prefixed so that no two different requests hash the same input.
    pub fn of(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Fingerprint {
        Fingerprint::of_chunks(method, uri, headers, &[body])
    }

    /// As [`Fingerprint::of`], for a body held as the chunks it arrived in (no concatenation).
    pub fn of_chunks<B: AsRef<[u8]>>(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[B],
    ) -> Fingerprint {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(method.as_str().as_bytes());
        field(
            uri.path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .as_bytes(),
        );
        for name in FINGERPRINT_HEADERS {
            let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            field(&(values.len() as u64).to_be_bytes());
            for v in values {
                field(v);
            }
        }
        let len: usize = body.iter().map(|c| c.as_ref().len()).sum();
        h.update((len as u64).to_be_bytes());
        for chunk in body {
            h.update(chunk.as_ref());
        }
        Fingerprint(h.finalize().into())
    }
}

/// A stored answer replayed to a retry of a request that failed deterministically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// The original Content-Type.
    pub content_type: Option<String>,
    /// The original body (bounded by [`MAX_REPLAY_BODY`]).
    #[serde(with = "hex_bytes_vec")]
    pub body: Vec<u8>,
}

/// Largest 4xx body kept for replay; larger ones are replayed as a bare status.
pub const MAX_REPLAY_BODY: usize = 16 * 1024;

/// What the store remembers about a request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Entry {
    /// Forwarded, no answer yet.
    InFlight {
        /// The claimed request's fingerprint.
        fingerprint: Fingerprint,
    },
    /// Answered deterministically.
    Done {
        /// The original request's fingerprint.
        fingerprint: Fingerprint,
        /// The upstream's status.
        status: u16,
        /// The reference id the receiver created (`Location`), for the 409 diagnostics.
        reference: Option<Box<str>>,
        /// For a 4xx: the answer to replay (boxed: most entries have none, and a million
        /// entries must fit in little memory).
        replay: Option<Box<Replay>>,
    },
}

impl Entry {
    fn fingerprint(&self) -> Fingerprint {
        match self {
            Entry::InFlight { fingerprint } | Entry::Done { fingerprint, .. } => *fingerprint,
        }
    }
}

/// The outcome of claiming a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Never seen (or forgotten): forward it.
    First,
    /// Seen, with the same content.
    Seen(Entry),
    /// Seen with other content: 422.
    Conflict,
}

impl Claim {
    /// Decides from the entry found under the id (or none, when the claim was written).
    pub fn from_existing(existing: Option<Entry>, fingerprint: Fingerprint) -> Claim {
        match existing {
            None => Claim::First,
            Some(e) if e.fingerprint() == fingerprint => Claim::Seen(e),
            Some(_) => Claim::Conflict,
        }
    }
}

/// The store could not be consulted.
#[derive(Debug, thiserror::Error)]
#[error("dedup store unavailable: {0}")]
pub struct StoreError(pub String);

/// How long an in-flight claim lives: a crashed gateway must not block retries for the whole
/// `ttl`, yet the claim must outlive any answer that can still arrive.
pub fn in_flight_ttl(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(30)
}

/// The configured store.
pub enum DedupStore {
    /// In process, bounded.
    Memory(memory::MemoryStore),
    /// Redis, shared by replicas.
    Redis(redis::RedisStore),
}

impl DedupStore {
    /// Builds the configured store. The Redis store connects lazily: Redis down at start does not
    /// stop the gateway (requests follow `on_store_error`, readiness reports it).
    pub fn new(
        settings: &DedupSettings,
        request_timeout: Duration,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<DedupStore, StoreError> {
        let in_flight = in_flight_ttl(request_timeout);
        Ok(match &settings.backend {
            DedupBackend::Memory => DedupStore::Memory(memory::MemoryStore::new(
                settings.max_entries,
                settings.ttl,
                in_flight,
                metrics,
            )),
            DedupBackend::Redis { url } => {
                DedupStore::Redis(redis::RedisStore::new(url, settings.ttl, in_flight)?)
            }
        })
    }

    /// Claims `id` for a request with `fingerprint`: atomically records it in flight unless an
    /// entry exists, and reports what was there.
    pub async fn claim(
        &self,
        id: RequestId,
        fingerprint: Fingerprint,
    ) -> Result<Claim, StoreError> {
        match self {
            DedupStore::Memory(s) => Ok(s.claim(id, fingerprint)),
            DedupStore::Redis(s) => s.claim(id, fingerprint).await,
        }
    }

    /// Records the deterministic answer to a claimed request.
    pub async fn complete(&self, id: RequestId, entry: Entry) -> Result<(), StoreError> {
        match self {
            DedupStore::Memory(s) => {
                s.complete(id, entry);
                Ok(())
            }
            DedupStore::Redis(s) => s.complete(id, entry).await,
        }
    }

    /// Forgets a claimed request (transient failure: the retry must go through).
    pub async fn release(&self, id: RequestId) -> Result<(), StoreError> {
        match self {
            DedupStore::Memory(s) => {
                s.release(id);
                Ok(())
            }
            DedupStore::Redis(s) => s.release(id).await,
        }
    }

    /// How many ids the store holds, where that is its own count: the memory store. Redis is
    /// shared with other keys and replicas, so it has none (`None`).
    pub fn entry_count(&self) -> Option<u64> {
        match self {
            DedupStore::Memory(s) => Some(s.entry_count()),
            DedupStore::Redis(_) => None,
        }
    }

    /// Whether the store answers now (readiness).
    pub async fn is_reachable(&self) -> bool {
        match self {
            DedupStore::Memory(_) => true,
            DedupStore::Redis(s) => s.ping().await,
        }
    }
}

/// Whether an upstream status is a deterministic answer worth remembering (DESIGN.md §5): 2xx,
/// and 4xx other than 408 (timeout), 425 (too early) and 429 (throttled), which invite a retry.
pub fn is_deterministic(status: u16) -> bool {
    (200..300).contains(&status)
        || ((400..500).contains(&status) && ![408, 425, 429].contains(&status))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("fingerprint must be 32 bytes"))
    }
}

mod hex_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "x-correlation-id",
            HeaderValue::from_static("9562466f-c982-4bd5-bb0e-255e9f5e6689"),
        );
        h.insert(
            "content-type",
            HeaderValue::from_static("application/fhir+json"),
        );
        h.insert("nhsd-target-identifier", HeaderValue::from_static("eyJ9"));
        h.insert("authorization", HeaderValue::from_static("Bearer one"));
        h
    }

    #[test]
    fn fingerprint_ignores_the_access_token_but_not_the_content() {
        let uri: Uri = "/$process-message".parse().unwrap();
        let a = Fingerprint::of(&Method::POST, &uri, &headers(), b"{}");
        let mut h2 = headers();
        h2.insert("authorization", HeaderValue::from_static("Bearer two"));
        assert_eq!(
            a,
            Fingerprint::of(&Method::POST, &uri, &h2, b"{}"),
            "a fresh token is still a retry"
        );
        assert_ne!(
            a,
            Fingerprint::of(&Method::POST, &uri, &headers(), b"{ }"),
            "body counts"
        );
        assert_ne!(
            a,
            Fingerprint::of(&Method::PUT, &uri, &headers(), b"{}"),
            "method counts"
        );
        let other: Uri = "/$process-message?x=1".parse().unwrap();
        assert_ne!(
            a,
            Fingerprint::of(&Method::POST, &other, &headers(), b"{}"),
            "query counts"
        );
        let mut h3 = headers();
        h3.insert(
            "x-correlation-id",
            HeaderValue::from_static("00000000-c982-4bd5-bb0e-255e9f5e6689"),
        );
        assert_ne!(
            a,
            Fingerprint::of(&Method::POST, &uri, &h3, b"{}"),
            "correlation id counts"
        );
        let mut h4 = headers();
        h4.remove("content-type");
        assert_ne!(
            a,
            Fingerprint::of(&Method::POST, &uri, &h4, b"{}"),
            "content type counts"
        );
    }

    #[test]
    fn fingerprint_of_chunks_equals_fingerprint_of_the_whole_body() {
        let uri: Uri = "/$process-message".parse().unwrap();
        let whole = Fingerprint::of(&Method::POST, &uri, &headers(), b"{\"a\":1}");
        let chunks = [&b"{\"a"[..], &b"\":"[..], &b""[..], &b"1}"[..]];
        assert_eq!(
            whole,
            Fingerprint::of_chunks(&Method::POST, &uri, &headers(), &chunks)
        );
    }

    #[test]
    fn deterministic_statuses_are_2xx_and_most_4xx() {
        for s in [200, 201, 204, 400, 404, 409, 422] {
            assert!(is_deterministic(s), "{s}");
        }
        for s in [408, 425, 429, 500, 502, 503, 504, 301] {
            assert!(!is_deterministic(s), "{s}");
        }
    }

    #[test]
    fn entries_round_trip_through_json() {
        let e = Entry::Done {
            fingerprint: Fingerprint([7; 32]),
            status: 400,
            reference: Some("ID-1".into()),
            replay: Some(Box::new(Replay {
                content_type: Some("application/fhir+json".into()),
                body: b"{}".to_vec(),
            })),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), e);
    }
}
