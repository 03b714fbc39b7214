//! The state a reload swaps: the TLS material and the admission lists. The gateway reads the
//! current one for each connection; the reloader (`reload.rs`) builds a new one and swaps it in.

use crate::admission::AdmissionPolicy;
use crate::config::Settings;
use crate::tls::LoadedTls;

/// What a reload replaces: TLS material and the admission lists, swapped atomically.
#[derive(Debug)]
pub struct LiveState {
    /// The TLS configuration handshakes use.
    pub tls: LoadedTls,
    /// The admission policy connections are checked against.
    pub admission: AdmissionPolicy,
}

impl LiveState {
    /// The live state for `settings`, with TLS material loaded from them (how the reloader builds
    /// the state it swaps in, and how start builds the first one).
    pub fn build(settings: &Settings, tls: LoadedTls) -> LiveState {
        LiveState {
            tls,
            admission: AdmissionPolicy::from_settings(&settings.client, &settings.listen),
        }
    }
}
