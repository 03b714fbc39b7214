//! One audit record per request (log target `audit`): who, what, outcome. Never bodies, never
//! decoded data beyond the identifiers listed here.
//!
//! The record is written when the response has been sent, not when its head is ready: a body that
//! breaks off on the way (the legacy system reset, sent bad chunk framing or closed early) is
//! recorded as an upstream failure (`status=502`, `upstream_error`), not as the 200 its head said.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::bars::identity::{OdsCode, TargetIdentifier};
use crate::bars::ids::{CorrelationId, RequestId};
use crate::bars::Refusal;
use crate::upstream::{BoxError, GatewayBody};

/// The verified client of a connection, as the audit record names it.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The admitted client address.
    pub client: IpAddr,
    /// The client certificate's subject.
    pub cert_subject: String,
    /// The client certificate's SHA-256, hex.
    pub cert_sha256: String,
}

/// What is known about one request, filled in as it goes through the pipeline.
pub(crate) struct AuditRecord {
    peer: Arc<Peer>,
    started: Instant,
    method: http::Method,
    uri: http::Uri,
    /// The BaRS endpoint the route resolved to.
    pub endpoint: Option<&'static str>,
    /// `X-Request-Id`, once validated.
    pub request_id: Option<RequestId>,
    /// `X-Correlation-Id`, once validated.
    pub correlation_id: Option<CorrelationId>,
    /// `system|value` of NHSD-Target-Identifier.
    pub target: Option<TargetIdentifier>,
    /// The ODS code of NHSD-End-User-Organisation.
    pub ods_code: Option<OdsCode>,
    /// The software id of NHSD-Requesting-Software.
    pub software: Option<String>,
    /// Why the gateway answered itself.
    pub refusal: Option<Refusal>,
    /// The dedup outcome.
    pub dedup: Option<&'static str>,
    /// Time to the legacy system's response head.
    pub upstream_duration: Option<Duration>,
}

/// Displays an optional value, or `-` when absent (audit fields are always present).
struct OrDash<'a, T>(&'a Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl AuditRecord {
    /// Cheap: clones the peer's `Arc` and the method and URI (reference-counted); nothing is
    /// formatted unless a log line is written.
    pub(crate) fn new<B>(peer: &Arc<Peer>, request: &http::Request<B>) -> AuditRecord {
        AuditRecord {
            peer: peer.clone(),
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            endpoint: None,
            request_id: None,
            correlation_id: None,
            target: None,
            ods_code: None,
            software: None,
            refusal: None,
            dedup: None,
            upstream_duration: None,
        }
    }

    /// Hands the record to the response: it is written when the body has been sent (or broke
    /// off, or the client went away). With `audit = false` only refusals are logged, at once.
    pub(crate) fn attach(
        self,
        audit: bool,
        response: Response<GatewayBody>,
    ) -> Response<GatewayBody> {
        if !audit {
            self.log_refusal(response.status().as_u16());
            return response;
        }
        let status = response.status().as_u16();
        response.map(|inner| {
            AuditedBody {
                inner,
                pending: Some((self, status)),
            }
            .boxed_unsync()
        })
    }

    fn log_refusal(&self, status: u16) {
        let Some(refusal) = &self.refusal else {
            return;
        };
        tracing::info!(
            client = %self.peer.client,
            request_id = %OrDash(&self.request_id),
            correlation_id = %OrDash(&self.correlation_id),
            status,
            reason = refusal.reason(),
            diagnostics = %refusal,
            "request refused"
        );
    }

    fn write(self, status: u16, upstream_error: Option<&str>) {
        let bars_code = self.refusal.as_ref().map(Refusal::bars_code);
        let diagnostics = self.refusal.as_ref().map(|r| r.to_string());
        let total = self.started.elapsed();
        tracing::info!(
            target: "audit",
            client = %self.peer.client,
            cert_subject = %self.peer.cert_subject,
            cert_sha256 = %self.peer.cert_sha256,
            method = %self.method,
            path = %self.uri.path(),
            endpoint = self.endpoint.unwrap_or("-"),
            request_id = %OrDash(&self.request_id),
            correlation_id = %OrDash(&self.correlation_id),
            bars_target = %OrDash(&self.target),
            ods_code = %OrDash(&self.ods_code),
            software = self.software.as_deref().unwrap_or("-"),
            status,
            bars_code = bars_code.unwrap_or("-"),
            diagnostics = diagnostics.as_deref().unwrap_or(""),
            dedup = self.dedup.unwrap_or("-"),
            upstream_error = upstream_error.unwrap_or("-"),
            upstream_ms = self.upstream_duration.map(|d| d.as_millis() as u64),
            total_ms = total.as_millis() as u64,
            "request"
        );
    }
}

/// A response body that writes its request's audit record when it ends.
struct AuditedBody {
    inner: GatewayBody,
    pending: Option<(AuditRecord, u16)>,
}

impl AuditedBody {
    fn finish(&mut self, upstream_error: Option<&str>) {
        if let Some((record, status)) = self.pending.take() {
            // The sender got the head and then a broken connection: no usable answer.
            let status = if upstream_error.is_some() {
                502
            } else {
                status
            };
            record.write(status, upstream_error);
        }
    }
}

impl Body for AuditedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(None),
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                self.finish(Some(&e));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    /// A body never polled to its end (HEAD, an empty body hyper does not poll, a client that went
    /// away) still gets its record.
    fn drop(&mut self) {
        self.finish(None);
    }
}
