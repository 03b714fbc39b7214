//! libFuzzer entry point; the body is `bars_gateway_fuzz::proxy_header` (shared with tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bars_gateway_fuzz::proxy_header(data));
