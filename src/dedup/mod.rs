//! Retry deduplication by X-Request-Id (DESIGN.md §5; BaRS IG "Transactional integrity").
//!
//! A request id is claimed *in flight* before the request is forwarded ("stored ahead of the
//! message being processed but after any access control"), then recorded *done* with the
//! upstream's status when the answer is deterministic (2xx, or a 4xx other than 408/425/429), or
//! forgotten when it is transient (408, 429, 5xx, timeout, unreachable) so the sender's retry
//! goes through. A retry of a done request gets 409 (or the original 4xx again), a retry while
//! the original is in flight gets 425, and the same id with other content gets 422.
//!
//! An outcome the gateway cannot know (the request was written but no usable answer came) is
//! recorded *uncertain*: the retry is delivered (a referral is never lost) and marked to the legacy
//! system as a possible duplicate. [`once`] runs the whole exchange: claim, forward once, record
//! (late answers included), replay.

pub mod memory;
pub mod once;
pub mod redis;
pub mod reference;
mod settings;

pub use settings::{DedupBackend, DedupSettings, OnStoreError};

use std::time::Duration;

use http::header::{HeaderMap, HeaderName};
use http::{Method, Uri};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bars::headers::{
    CORRELATION_ID_KEY, END_USER_ORGANISATION_KEY, REQUESTING_PRACTITIONER_KEY,
    REQUESTING_SOFTWARE_KEY, TARGET_IDENTIFIER_KEY,
};
use crate::bars::ids::RequestId;

/// SHA-256 over everything that makes two requests "the same message" (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(#[serde(with = "hex_bytes")] pub [u8; 32]);

/// The headers the fingerprint covers besides the correlation id (the access token is excluded:
/// a retry may carry a fresh one).
const FINGERPRINT_HEADERS: [HeaderName; 6] = [
    CORRELATION_ID_KEY,
    TARGET_IDENTIFIER_KEY,
    END_USER_ORGANISATION_KEY,
    REQUESTING_SOFTWARE_KEY,
    REQUESTING_PRACTITIONER_KEY,
    http::header::CONTENT_TYPE,
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
    /// The original body, whole (at most `dedup.max_replay_bytes`; empty when `too_large`).
    #[serde(with = "hex_bytes_vec")]
    pub body: Vec<u8>,
    /// The original body was over `dedup.max_replay_bytes`: a retry gets a gateway
    /// OperationOutcome with the same status instead.
    #[serde(default)]
    pub too_large: bool,
}

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
    /// Forwarded, and no usable answer came (reset, broken body, completion timeout): the legacy
    /// system may or may not have processed it. The next retry is delivered, marked.
    Uncertain {
        /// The request's fingerprint.
        fingerprint: Fingerprint,
    },
}

impl Entry {
    fn fingerprint(&self) -> Fingerprint {
        match self {
            Entry::InFlight { fingerprint }
            | Entry::Done { fingerprint, .. }
            | Entry::Uncertain { fingerprint } => *fingerprint,
        }
    }
}

/// The outcome of claiming a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Never seen (or forgotten): forward it.
    First,
    /// Claimed after an uncertain outcome of the same request: forward it, marked as a possible
    /// duplicate for the legacy system.
    AfterUncertain,
    /// Seen, with the same content (in flight or done; never uncertain).
    Seen(Entry),
    /// Seen with other content: 422.
    Conflict,
}

impl Claim {
    /// Decides from the entry found under the id (or none, when the claim was written). An
    /// uncertain entry is never returned as `Seen`: the store replaces it with the new claim.
    pub fn from_existing(existing: Option<Entry>, fingerprint: Fingerprint) -> Claim {
        match existing {
            None => Claim::First,
            Some(e) if e.fingerprint() != fingerprint => Claim::Conflict,
            Some(Entry::Uncertain { .. }) => Claim::AfterUncertain,
            Some(e) => Claim::Seen(e),
        }
    }
}

/// The store could not be consulted.
#[derive(Debug, thiserror::Error)]
#[error("dedup store unavailable: {0}")]
pub struct StoreError(pub String);

/// How long an in-flight claim lives: a crashed gateway must not block retries for the whole
/// `ttl`, yet the claim must outlive any answer that can still arrive (the exchange goes on up to
/// `completion_timeout` after the forward, which starts within `request_timeout`).
pub fn in_flight_ttl(request_timeout: Duration, completion_timeout: Duration) -> Duration {
    completion_timeout + request_timeout + Duration::from_secs(30)
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
        in_flight: Duration,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<DedupStore, StoreError> {
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

    /// Records the deterministic answer to a claimed request, or that its outcome is uncertain
    /// (`Entry::Uncertain`, kept for the full ttl so that the retry is marked whenever it comes).
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

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("fingerprint must be 32 bytes"))
    }
}

mod hex_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
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
    fn the_in_flight_claim_outlives_the_completion_timeout() {
        let ttl = in_flight_ttl(Duration::from_secs(5), Duration::from_secs(120));
        assert!(ttl > Duration::from_secs(125), "{ttl:?}");
    }

    #[test]
    fn an_uncertain_entry_of_the_same_request_is_claimed_after_uncertain() {
        let fp = Fingerprint([3; 32]);
        assert_eq!(
            Claim::from_existing(Some(Entry::Uncertain { fingerprint: fp }), fp),
            Claim::AfterUncertain
        );
        assert_eq!(
            Claim::from_existing(
                Some(Entry::Uncertain { fingerprint: fp }),
                Fingerprint([4; 32])
            ),
            Claim::Conflict
        );
        let text = serde_json::to_string(&Entry::Uncertain { fingerprint: fp }).unwrap();
        assert!(text.starts_with(r#"{"state":"uncertain""#), "{text}");
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
                too_large: false,
            })),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), e);
    }
}
