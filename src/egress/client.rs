//! The pooled HTTPS client to the BaRS API and the token endpoint: hyper-util's client over
//! hyper-rustls (ring), HTTP/1.1 or h2 by ALPN, the server verified against the system trust store
//! or, when `egress.ca` is set, against those CA files only.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::settings::EgressSettings;
use crate::tls::material::{read_certificates, MaterialError};

/// The client type (requests carry the legacy system's buffered body, so they can be re-sent).
pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the client. Blocking: reads the CA files or the system trust store.
pub(crate) fn build(settings: &EgressSettings) -> Result<HttpsClient, MaterialError> {
    let mut roots = rustls::RootCertStore::empty();
    if settings.ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A system store can hold certificates webpki cannot parse; skip those, as curl does.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(MaterialError {
                key: "egress.ca".into(),
                path: Default::default(),
                problem: format!(
                    "the system trust store is empty or unreadable ({} errors): install ca-certificates or set egress.ca",
                    found.errors.len()
                ),
            });
        }
    } else {
        for (i, path) in settings.ca.iter().enumerate() {
            let key = format!("egress.ca[{i}]");
            for cert in read_certificates(&key, path)? {
                roots.add(cert).map_err(|e| MaterialError {
                    key: key.clone(),
                    path: path.clone(),
                    problem: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MaterialError {
        key: "egress".into(),
        path: Default::default(),
        problem: format!("TLS setup: {e}"),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
