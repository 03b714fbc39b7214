//! libFuzzer entry point; the body is `bars_gateway_fuzz::identity_headers` (shared with tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bars_gateway_fuzz::identity_headers(data));
