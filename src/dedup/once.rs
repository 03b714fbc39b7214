//! Delivery of a deduplicated request, exactly once (DESIGN.md §5): claim the request id, forward a
//! first sight, record what the legacy system answered, or answer a retry here without troubling
//! it. The promise: a request is delivered to the legacy system once, or the sender is told that it
//! was not.
//!
//! The exchange runs in its own task, so that neither the sender's deadline nor a sender that goes
//! away ends it:
//! - the sender waits at most until its deadline (`upstream.request_timeout` from the request
//!   head) and then gets 408; the exchange goes on up to `upstream.completion_timeout`, the id still
//!   in flight (retries get 425), and its late answer is recorded like an on-time one;
//! - the answer body streams to the sender while a copy of up to `dedup.max_replay_bytes` is kept,
//!   whatever its framing: a deterministic 4xx is replayed whole, and a 2xx's reference id is taken
//!   from it when there is no `Location`;
//! - an outcome the gateway cannot know (the request was written, no usable answer came: reset,
//!   broken body, unusable head, completion timeout) is recorded *uncertain*: the retry is
//!   delivered, marked `X-BaRS-Possible-Duplicate: true`, counted and logged at WARN.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::Response;
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{reference, Claim, DedupStore, Entry, Fingerprint, Replay};
use crate::bars::ids::RequestIds;
use crate::bars::Refusal;
use crate::config::OnStoreError;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::upstream::{
    BoxError, BufferedBody, ForwardedHeaders, GatewayBody, Upstream, UpstreamBody, Upstreams,
};

/// Frames buffered between the exchange task and the sender's response.
const STREAM_FRAMES: usize = 4;

/// Everything the delivery of a deduplicated request needs, built once at start.
pub struct Deliverer {
    /// The dedup store.
    pub store: Arc<DedupStore>,
    /// The legacy receivers.
    pub upstreams: Arc<Upstreams>,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// What a store failure means.
    pub on_store_error: OnStoreError,
    /// Largest answer body kept (replay of a 4xx, reference of a 2xx).
    pub max_replay_bytes: usize,
    /// How long the exchange goes on, from the forward, however long the sender waits.
    pub completion_timeout: Duration,
}

/// One deduplicated request, checked and read, ready to be delivered.
pub struct Delivery {
    /// Where it goes.
    pub upstream: Arc<Upstream>,
    /// Its ids (the request id is the dedup key).
    pub ids: RequestIds,
    /// What makes a retry "the same message".
    pub fingerprint: Fingerprint,
    /// Its head.
    pub parts: http::request::Parts,
    /// Its body, read whole.
    pub body: BufferedBody,
    /// The approved path and query.
    pub path_and_query: String,
    /// What the gateway adds for the legacy system.
    pub added: ForwardedHeaders,
}

/// What the dedup step decided, for the response, the metrics and the audit record.
pub struct Delivered {
    /// What the sender gets.
    pub response: Result<Response<GatewayBody>, Refusal>,
    /// The dedup outcome, for the audit record.
    pub dedup: &'static str,
    /// Time to the legacy system's response head, when it was asked.
    pub upstream_duration: Option<Duration>,
}

impl Delivered {
    fn here(response: Result<Response<GatewayBody>, Refusal>, dedup: &'static str) -> Delivered {
        Delivered {
            response,
            dedup,
            upstream_duration: None,
        }
    }
}

/// How the claim went: whether to record the outcome, and whether the retry is marked.
#[derive(Clone, Copy)]
struct Claimed {
    record: bool,
    marked: bool,
}

impl Deliverer {
    /// Delivers `delivery` once; the sender's answer comes by `deadline` (else 408, while the
    /// exchange goes on and is still recorded).
    pub async fn deliver(self: &Arc<Self>, delivery: Delivery, deadline: Instant) -> Delivered {
        let ids = delivery.ids;
        let (answer, answered) = oneshot::channel();
        tokio::spawn(self.clone().exchange(delivery, answer));
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(delivered)) => delivered,
            Ok(Err(_)) => {
                tracing::error!(request_id = %ids.request_id, "delivery task ended without an answer");
                Delivered::here(Err(Refusal::Internal), "internal")
            }
            Err(_) => {
                tracing::warn!(
                    request_id = %ids.request_id,
                    correlation_id = %ids.correlation_id,
                    "no answer within upstream.request_timeout: the sender gets 408; the exchange goes on (upstream.completion_timeout) and its outcome is recorded"
                );
                Delivered::here(Err(Refusal::UpstreamTimeout), "pending")
            }
        }
    }

    fn count(&self, outcome: &'static str) -> &'static str {
        self.metrics
            .dedup
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        outcome
    }

    /// The whole exchange: claim, forward once, stream and keep the answer, record.
    async fn exchange(self: Arc<Self>, d: Delivery, answer: oneshot::Sender<Delivered>) {
        let id = d.ids.request_id;
        let claimed = match self.store.claim(id, d.fingerprint).await {
            Ok(Claim::First) => Claimed {
                record: true,
                marked: false,
            },
            Ok(Claim::AfterUncertain) => Claimed {
                record: true,
                marked: true,
            },
            Ok(Claim::Seen(entry)) => {
                let _ = answer.send(self.answer_retry(entry));
                return;
            }
            Ok(Claim::Conflict) => {
                let _ = answer.send(Delivered::here(
                    Err(Refusal::IdReused),
                    self.count("id_reused"),
                ));
                return;
            }
            Err(e) => match self.on_store_error {
                OnStoreError::Reject => {
                    tracing::warn!(request_id = %id, error = %e, "dedup store unavailable: refusing with 503 so the sender retries");
                    let _ = answer.send(Delivered::here(
                        Err(Refusal::StoreUnavailable),
                        self.count("store_error"),
                    ));
                    return;
                }
                OnStoreError::Allow => {
                    tracing::error!(request_id = %id, error = %e, "dedup store unavailable: forwarding WITHOUT duplicate protection (dedup.on_store_error = allow)");
                    self.count("store_error");
                    Claimed {
                        record: false,
                        marked: false,
                    }
                }
            },
        };
        let dedup = match (claimed.record, claimed.marked) {
            (false, _) => "unprotected",
            (true, false) => self.count("first"),
            (true, true) => self.count("first_after_uncertain"),
        };
        let mut added = d.added;
        added.possible_duplicate = claimed.marked;
        let started = Instant::now();
        let completion = started + self.completion_timeout;
        let head = self
            .upstreams
            .send(
                &d.upstream,
                d.parts,
                d.body.into_body(),
                &d.path_and_query,
                &added,
                completion,
            )
            .await;
        let upstream_duration = Some(started.elapsed());
        self.metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
        let response = match head {
            Ok(response) => response,
            Err(failure) => {
                let mut dedup = dedup;
                if claimed.record {
                    if failure.may_have_been_processed() {
                        self.uncertain(d.ids, d.fingerprint, &failure.to_string())
                            .await;
                        dedup = "uncertain";
                    } else {
                        self.forget(d.ids, d.fingerprint, claimed.marked).await;
                    }
                }
                let _ = answer.send(Delivered {
                    response: Err(failure.refusal(self.upstreams.max_body())),
                    dedup,
                    upstream_duration,
                });
                return;
            }
        };
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let body = self.upstreams.watch_body(body, &added);
        if !claimed.record || !super::is_deterministic(status) {
            // Transient (408, 429, 5xx): forget, so the sender's retry goes through; the body
            // streams straight to the sender.
            if claimed.record {
                self.forget(d.ids, d.fingerprint, claimed.marked).await;
            }
            let _ = answer.send(Delivered {
                response: Ok(Response::from_parts(parts, body.boxed_unsync())),
                dedup,
                upstream_duration,
            });
            return;
        }
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let location = parts.headers.get(http::header::LOCATION).cloned();
        let (tx, channel) = Channel::<Bytes, BoxError>::new(STREAM_FRAMES);
        let sender_waits = answer
            .send(Delivered {
                response: Ok(Response::from_parts(parts, channel.boxed_unsync())),
                dedup,
                upstream_duration,
            })
            .is_ok();
        let kept = self
            .stream_and_keep(body, sender_waits.then_some(tx), completion)
            .await;
        let kept = match kept {
            Ok(kept) => kept,
            Err(problem) => {
                self.uncertain(d.ids, d.fingerprint, &problem).await;
                return;
            }
        };
        let (body, too_large) = match kept {
            Some(body) => (body, false),
            None => (Vec::new(), true),
        };
        let reference = reference::reference_of(location.as_ref(), &body);
        let replay = (400..500).contains(&status).then(|| {
            Box::new(Replay {
                content_type,
                body,
                too_large,
            })
        });
        let entry = Entry::Done {
            fingerprint: d.fingerprint,
            status,
            reference,
            replay,
        };
        if let Err(e) = self.store.complete(id, entry).await {
            tracing::error!(request_id = %id, error = %e, "dedup store: could not record a processed request; a retry after the in-flight entry expires would be delivered again");
        }
        if !sender_waits {
            self.count("late");
            tracing::info!(
                request_id = %id,
                correlation_id = %d.ids.correlation_id,
                status,
                "late answer recorded: retries get what it would have given"
            );
        }
    }

    /// Streams the answer body to the sender (while it listens) and keeps a copy of up to
    /// `max_replay_bytes` (`None` when it was larger). `Err` when the body broke off or did not end
    /// by `completion`: the sender's body is then aborted, never ended cleanly (a clean end of a
    /// chunked body would pass a truncated answer off as whole).
    async fn stream_and_keep(
        &self,
        mut body: UpstreamBody,
        mut tx: Option<Sender<Bytes, BoxError>>,
        completion: Instant,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut kept = Some(Vec::new());
        let problem = loop {
            let frame = match tokio::time::timeout_at(completion, body.frame()).await {
                Err(_) => break "upstream.completion_timeout passed mid-body".to_string(),
                Ok(None) => return Ok(kept),
                Ok(Some(Err(e))) => break format!("the response body broke off: {e}"),
                Ok(Some(Ok(frame))) => frame,
            };
            if let (Some(data), Some(buffer)) = (frame.data_ref(), kept.as_mut()) {
                if buffer.len() + data.len() <= self.max_replay_bytes {
                    buffer.extend_from_slice(data);
                } else {
                    kept = None;
                }
            }
            if let Some(sender) = tx.as_mut() {
                match tokio::time::timeout_at(completion, sender.send(frame)).await {
                    Ok(Ok(())) => {}
                    // The sender went away: keep reading, the outcome must still be recorded.
                    Ok(Err(_)) => tx = None,
                    Err(_) => {
                        if let Some(sender) = tx.take() {
                            sender.abort("the sender did not read the answer in time".into());
                        }
                    }
                }
            }
        };
        if let Some(sender) = tx {
            sender.abort(problem.clone().into());
        }
        Err(problem)
    }

    /// The answer to a retry of a request seen before.
    fn answer_retry(&self, entry: Entry) -> Delivered {
        match entry {
            Entry::InFlight { .. } | Entry::Uncertain { .. } => {
                Delivered::here(Err(Refusal::InFlight), self.count("in_flight"))
            }
            Entry::Done {
                status, reference, ..
            } if (200..300).contains(&status) => Delivered::here(
                Err(Refusal::Duplicate {
                    reference: reference.map(String::from),
                }),
                self.count("duplicate"),
            ),
            Entry::Done { status, replay, .. } => match replay {
                Some(r) if r.too_large => Delivered::here(
                    Err(Refusal::ReplayTooLarge { status }),
                    self.count("replayed"),
                ),
                replay => {
                    Delivered::here(Ok(replay_response(status, replay)), self.count("replayed"))
                }
            },
        }
    }

    /// A transient failure that certainly did not deliver, or a transient answer: the retry must
    /// go through. A retry that was itself marked stays marked (its predecessor's outcome is still
    /// unknown).
    async fn forget(&self, ids: RequestIds, fingerprint: Fingerprint, marked: bool) {
        let result = if marked {
            self.store
                .complete(ids.request_id, Entry::Uncertain { fingerprint })
                .await
        } else {
            self.store.release(ids.request_id).await
        };
        if let Err(e) = result {
            tracing::error!(request_id = %ids.request_id, error = %e, "dedup store: could not release a failed request; its retries get 425 until the in-flight entry expires");
        }
    }

    /// The request was written and no usable answer came: the legacy system may or may not have
    /// processed it. Never claim "processed" (a lost referral), never deliver again silently.
    async fn uncertain(&self, ids: RequestIds, fingerprint: Fingerprint, problem: &str) {
        self.count("uncertain");
        tracing::warn!(
            request_id = %ids.request_id,
            correlation_id = %ids.correlation_id,
            problem,
            "uncertain outcome: the legacy system may have processed this request; its retry will be delivered marked X-BaRS-Possible-Duplicate"
        );
        if let Err(e) = self
            .store
            .complete(ids.request_id, Entry::Uncertain { fingerprint })
            .await
        {
            tracing::error!(request_id = %ids.request_id, error = %e, "dedup store: could not record an uncertain outcome; its retries get 425 until the in-flight entry expires");
        }
    }
}

/// The original deterministic 4xx answer, again.
fn replay_response(status: u16, replay: Option<Box<Replay>>) -> Response<GatewayBody> {
    let (content_type, body) = match replay {
        Some(r) => (r.content_type, r.body),
        None => (None, Vec::new()),
    };
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
    if let Some(ct) = content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        response.headers_mut().insert(CONTENT_TYPE, ct);
    }
    response
}
