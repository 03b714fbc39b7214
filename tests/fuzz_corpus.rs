//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and the crash reproducers in
//! `fuzz/regressions/<target>/`) through the fuzz targets' own code, `fuzz/src/lib.rs`, compiled
//! here as a module. CI runs it on stable Rust without libFuzzer: an input that once found a bug,
//! or that the fuzzer kept for reaching new code, must never panic again.
//!
//! Deterministic: the inputs are files, replayed in name order, each target's functions being
//! pure apart from a temp directory of their own.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The committed inputs of one target, corpus first, each folder in name order.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = Vec::new();
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(folder).join(target)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("readable corpus folder").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        all.extend(files);
    }
    all
}

/// Runs every input of `target` through `run`; fails naming each input that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no committed inputs for {target} under fuzz/corpus or fuzz/regressions"
    );
    let panicked: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("readable corpus file");
            catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        panicked.is_empty(),
        "{} of {} {target} inputs panicked: {panicked:#?}",
        panicked.len(),
        files.len()
    );
}

#[test]
fn every_committed_identity_header_input_is_decoded_without_a_panic() {
    replay("identity_headers", targets::identity_headers);
}

#[test]
fn every_committed_proxy_header_input_is_read_within_its_length_without_a_panic() {
    replay("proxy_header", targets::proxy_header);
}

#[test]
fn every_committed_config_input_is_parsed_without_a_panic() {
    replay("config", targets::config);
}

#[test]
fn every_committed_tls_material_input_is_loaded_without_a_panic() {
    replay("tls_material", targets::tls_material);
}
