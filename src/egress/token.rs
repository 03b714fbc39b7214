//! The NHS API platform's "signed JWT authentication" (OAuth 2.0 client credentials with a private
//! key JWT, BARS-CONTEXT.md "The sender side"): the client assertion, the token request, and one
//! cached access token shared by every egress request.
//!
//! Single flight: the cache is a mutex held across the fetch, so however many requests find the
//! token stale, one token request goes out and the others wait for its answer (and share its
//! failure, instead of each trying in turn).
//!
//! Secrets: the access token, the assertion and the API key are never logged, never put in a
//! metric label or the audit record, and their types print as `<redacted>`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA512};
use rustls_pki_types::PrivateKeyDer;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::client::HttpsClient;
use super::metrics::EgressMetrics;
use super::settings::{SignedJwtSettings, API_KEY_CREDENTIAL, SIGNING_KEY_PASSWORD_CREDENTIAL};
use crate::tls::material::{read_private_key_as, read_secret, MaterialError, PrivateKeyKeys};

/// `client_assertion_type` of a private key JWT (RFC 7523).
pub(crate) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Smallest RSA modulus accepted for signing (the platform's and rustls' floor).
pub(crate) const MIN_RSA_BITS: usize = 2048;
/// Lifetime of one assertion. The platform refuses `exp` more than 5 minutes ahead; a minute less
/// leaves room for our clock running ahead of theirs.
const ASSERTION_LIFETIME: u64 = 240;
/// A cached token is renewed once less than this remains of its `expires_in`, so that a request
/// never sets off with a token that expires on the way (the platform issues 599 s tokens).
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Largest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

/// The sender's RSA key and the `kid` the platform knows its public half by.
pub(crate) struct SigningKey {
    /// The registered key id.
    pub key_id: String,
    pair: RsaKeyPair,
    /// The key as PKCS#8 or PKCS#1 DER, for printing the public half (`check`).
    pub der: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("bits", &self.bits())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads `egress.signing_key` (PKCS#8 plain or encrypted, or PKCS#1 PEM): it must be RSA of at
    /// least [`MIN_RSA_BITS`]. Blocking (file reads, and PBKDF2 for an encrypted key).
    pub(crate) fn load(settings: &SignedJwtSettings) -> Result<SigningKey, MaterialError> {
        let keys = PrivateKeyKeys {
            key: "egress.signing_key",
            password_key: "egress.signing_key_password_file",
            credential: SIGNING_KEY_PASSWORD_CREDENTIAL,
        };
        let path = &settings.signing_key;
        let der = read_private_key_as(keys, path, settings.signing_key_password_file.as_deref())?;
        let problem = |m: String| MaterialError {
            key: keys.key.into(),
            path: path.clone(),
            problem: m,
        };
        let pair = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => {
                return Err(problem(
                    "RS512 needs an RSA key; this is an EC key (generate one with `bars-gateway keygen`)"
                        .into(),
                ))
            }
        }
        .map_err(|e| problem(format!("not a usable RSA key for RS512: {e}")))?;
        let key = SigningKey {
            key_id: settings.key_id.clone(),
            pair,
            der,
        };
        if key.bits() < MIN_RSA_BITS {
            return Err(problem(format!(
                "the RSA key has {} bits; at least {MIN_RSA_BITS} are required",
                key.bits()
            )));
        }
        Ok(key)
    }

    /// The modulus size in bits.
    pub(crate) fn bits(&self) -> usize {
        self.pair.public().modulus_len() * 8
    }

    /// A fresh client assertion: RS512 JWT with `kid`, `iss` = `sub` = the API key, `aud` = the
    /// token URL, a new `jti`, `iat` now and `exp` four minutes on.
    pub(crate) fn assertion(
        &self,
        api_key: &ApiKey,
        audience: &str,
    ) -> Result<Secret, SigningError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| SigningError)?
            .as_secs();
        let header = serde_json::json!({"alg": "RS512", "typ": "JWT", "kid": self.key_id});
        let claims = serde_json::json!({
            "iss": api_key.0.as_ref(),
            "sub": api_key.0.as_ref(),
            "aud": audience,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let mut jwt = URL_SAFE_NO_PAD.encode(header.to_string());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA512,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| SigningError)?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(Secret(jwt.into()))
    }
}

/// The RSA signature could not be made (the system RNG failed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot sign the client assertion")]
pub(crate) struct SigningError;

/// A secret string (assertion, access token) that never prints.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Arc<str>);

impl Secret {
    /// The secret itself, for the wire only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The application's API key (`iss` and `sub` of the assertion).
#[derive(Clone)]
pub(crate) struct ApiKey(Arc<str>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ApiKey {
    /// Reads `egress.api_key_file`, else the systemd credential `api-key`.
    pub(crate) fn load(file: Option<&std::path::Path>) -> Result<ApiKey, MaterialError> {
        let key = read_secret("egress.api_key_file", file, API_KEY_CREDENTIAL)?;
        match key.map(|k| k.trim().to_string()) {
            Some(k) if !k.is_empty() && !k.chars().any(char::is_control) => {
                Ok(ApiKey(k.into()))
            }
            Some(_) => Err(MaterialError {
                key: "egress.api_key_file".into(),
                path: file.map(PathBuf::from).unwrap_or_default(),
                problem: "the API key is empty or has control characters".into(),
            }),
            None => Err(MaterialError {
                key: "egress.api_key_file".into(),
                path: file.map(PathBuf::from).unwrap_or_default(),
                problem: format!(
                    "no API key: set egress.api_key_file or provide the systemd credential {API_KEY_CREDENTIAL}"
                ),
            }),
        }
    }
}

/// Why no access token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TokenError {
    /// The token endpoint could not be reached, timed out, or failed (5xx).
    #[error("the token endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The token endpoint refused the assertion (its `error` and `error_description`).
    #[error("the token endpoint refused the gateway's credentials: {error}{}{}", .description.as_ref().map(|d| format!(": {d}")).unwrap_or_default(), .message_id.as_ref().map(|m| format!(" (message_id {m})")).unwrap_or_default())]
    Refused {
        /// HTTP status.
        status: u16,
        /// `error`, e.g. `invalid_request`.
        error: String,
        /// `error_description`.
        description: Option<String>,
        /// `message_id`, for the platform's support desk.
        message_id: Option<String>,
    },
    /// The answer was not a token.
    #[error("the token endpoint's answer is not a token: {0}")]
    Malformed(String),
    /// The assertion could not be signed.
    #[error(transparent)]
    Signing(#[from] SigningError),
}

struct Cached {
    token: Secret,
    obtained: Instant,
    refresh_at: Instant,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    last_error: Option<TokenError>,
}

/// The token endpoint's JSON (success or failure). No `Debug`: it holds the token.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<ExpiresIn>,
    error: Option<String>,
    error_description: Option<String>,
    message_id: Option<String>,
}

/// `expires_in`: the platform sends a string ("599"); RFC 6749 says a number. Both are taken.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Number(u64),
    Text(String),
}

/// One access token for the whole gateway, fetched on demand and renewed before it expires.
pub(crate) struct TokenSource {
    key: SigningKey,
    api_key: ApiKey,
    token_url: Uri,
    audience: String,
    client: HttpsClient,
    timeout: Duration,
    metrics: Arc<EgressMetrics>,
    state: Mutex<State>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source fetching from `token_url` (also the assertion's `aud`).
    pub(crate) fn new(
        key: SigningKey,
        api_key: ApiKey,
        token_url: Uri,
        client: HttpsClient,
        timeout: Duration,
        metrics: Arc<EgressMetrics>,
    ) -> TokenSource {
        TokenSource {
            key,
            api_key,
            audience: token_url.to_string(),
            token_url,
            client,
            timeout,
            metrics,
            state: Mutex::new(State::default()),
            fetches: AtomicU64::new(0),
        }
    }

    /// The cached token, or a new one if it is due for renewal (one fetch for all waiters).
    pub(crate) async fn token(&self) -> Result<Secret, TokenError> {
        let fetches_before = self.fetches.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(c) = &state.cached {
            if now < c.refresh_at {
                self.metrics
                    .token_age
                    .set(now.duration_since(c.obtained).as_secs() as i64);
                return Ok(c.token.clone());
            }
        }
        // A fetch finished while we waited and failed: share its answer rather than queue another.
        if self.fetches.load(Ordering::Acquire) != fetches_before {
            if let Some(e) = &state.last_error {
                return Err(e.clone());
            }
        }
        let result = self.fetch().await;
        self.fetches.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(cached) => {
                self.metrics.token_fetch("success");
                self.metrics.token_age.set(0);
                let token = cached.token.clone();
                state.cached = Some(cached);
                state.last_error = None;
                Ok(token)
            }
            Err(e) => {
                self.metrics.token_fetch("failure");
                state.cached = None;
                state.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Forgets `token` if it is still the cached one (the API answered 401 to it).
    pub(crate) async fn invalidate(&self, token: &Secret) {
        let mut state = self.state.lock().await;
        if state.cached.as_ref().is_some_and(|c| &c.token == token) {
            state.cached = None;
        }
    }

    async fn fetch(&self) -> Result<Cached, TokenError> {
        let assertion = self.key.assertion(&self.api_key, &self.audience)?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_assertion_type", ASSERTION_TYPE)
            .append_pair("client_assertion", assertion.expose())
            .finish();
        let request = Request::post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Unavailable(format!("cannot build the request: {e}")))?;
        let started = Instant::now();
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await
        {
            Err(_) => {
                let e = TokenError::Unavailable(format!("no answer within {:?}", self.timeout));
                tracing::warn!(token_url = %self.token_url, error = %e, "token request failed");
                return Err(e);
            }
            Ok(Err(e)) => {
                let e = TokenError::Unavailable(format!("cannot connect: {}", error_chain(&e)));
                tracing::warn!(token_url = %self.token_url, error = %e, "token request failed");
                return Err(e);
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let body = match tokio::time::timeout(
            self.timeout.saturating_sub(started.elapsed()),
            Limited::new(response.into_body(), MAX_TOKEN_ANSWER).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                let e =
                    TokenError::Unavailable(format!("the {status} answer's body did not arrive"));
                tracing::warn!(token_url = %self.token_url, error = %e, "token request failed");
                return Err(e);
            }
        };
        let answer: Option<TokenAnswer> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let e = match answer
                .and_then(|a| a.error.map(|e| (e, a.error_description, a.message_id)))
            {
                Some((error, description, message_id)) if status.is_client_error() => {
                    tracing::error!(
                        token_url = %self.token_url,
                        status = status.as_u16(),
                        error = %error,
                        error_description = description.as_deref().unwrap_or("-"),
                        message_id = message_id.as_deref().unwrap_or("-"),
                        kid = %self.key.key_id,
                        "token endpoint refused the client assertion"
                    );
                    TokenError::Refused {
                        status: status.as_u16(),
                        error,
                        description,
                        message_id,
                    }
                }
                Some((error, _, message_id)) => {
                    tracing::warn!(token_url = %self.token_url, status = status.as_u16(), error = %error, message_id = message_id.as_deref().unwrap_or("-"), "token request failed");
                    TokenError::Unavailable(format!("HTTP {status}: {error}"))
                }
                None => {
                    tracing::warn!(token_url = %self.token_url, status = status.as_u16(), "token request failed");
                    TokenError::Unavailable(format!("HTTP {status}"))
                }
            };
            return Err(e);
        }
        let Some(answer) = answer else {
            return Err(TokenError::Malformed("not JSON".into()));
        };
        let token = answer
            .access_token
            .filter(|t| !t.is_empty() && HeaderValue::from_str(&format!("Bearer {t}")).is_ok())
            .ok_or_else(|| TokenError::Malformed("no usable access_token".into()))?;
        let expires_in = match answer.expires_in {
            Some(ExpiresIn::Number(n)) => n,
            Some(ExpiresIn::Text(t)) => t.trim().parse().map_err(|_| {
                TokenError::Malformed("expires_in is not a number of seconds".into())
            })?,
            None => return Err(TokenError::Malformed("no expires_in".into())),
        };
        let obtained = Instant::now();
        let lifetime = Duration::from_secs(expires_in);
        tracing::info!(token_url = %self.token_url, expires_in, "access token obtained");
        Ok(Cached {
            token: Secret(token.into()),
            obtained,
            refresh_at: obtained + lifetime.saturating_sub(REFRESH_MARGIN),
        })
    }
}

/// `Authorization: Bearer …`, marked sensitive (HTTP/2 never indexes it).
pub(crate) fn bearer(token: &Secret) -> Option<(http::HeaderName, HeaderValue)> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose())).ok()?;
    value.set_sensitive(true);
    Some((AUTHORIZATION, value))
}

/// An error and its sources on one line (hyper's client errors say little at the top level).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
