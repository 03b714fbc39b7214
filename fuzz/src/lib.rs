//! The bodies of the fuzz targets, one function per target, each taking the fuzzer's bytes.
//!
//! Shared by the libFuzzer entry points (`fuzz/fuzz_targets/*.rs`, run with `cargo fuzz`) and by
//! `tests/fuzz_corpus.rs`, which compiles this file into the main package's tests to replay the
//! committed corpus on stable Rust in CI: both run exactly the same code paths. Beyond "does not
//! panic", each target asserts the promise its parser makes to the rest of the gateway.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bars_gateway::admission::{read_proxy_header, V2_MAX_PAYLOAD};
use bars_gateway::bars::identity::{
    read_identity_headers, IdentityPolicy, IdentityRequirements, NHSD_END_USER_ORGANISATION,
    NHSD_REQUESTING_PRACTITIONER, NHSD_REQUESTING_SOFTWARE, NHSD_TARGET_IDENTIFIER,
};
use bars_gateway::config::Settings;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, ReadBuf};

/// The PROXY protocol v2 signature (the spec's, section 2.2).
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// The identity headers in the order the input's chunks are assigned to them (chunk `i` goes to
/// header `i % 4`, so a fifth chunk repeats the first header).
const IDENTITY_HEADERS: [&str; 4] = [
    NHSD_TARGET_IDENTIFIER,
    NHSD_END_USER_ORGANISATION,
    NHSD_REQUESTING_SOFTWARE,
    NHSD_REQUESTING_PRACTITIONER,
];

/// `read_identity_headers` over a header map built from the input.
///
/// Input: one flags byte, then header values separated by `\n` (which no header value can
/// hold). Flags bits 0–2 make the target, organisation and software headers required; bit 3
/// Base64-encodes each value first, so the fuzzer explores the JSON and FHIR-shape rules
/// directly instead of having to discover Base64; bit 4 reads in the default lenient mode
/// instead of strict mode, bit 5 then marks the target as needed for routing.
///
/// Asserts: a required header is present in every success (read, or in lenient mode reported as
/// a warning), strict mode and a needed target never end in a warning, and the values the
/// gateway forwards (`X-BaRS-Target`, `X-BaRS-Ods-Code`) are always valid header values: the
/// pipeline turns them into headers with `HeaderValue::from_str(..).ok()`, so an invalid one
/// would silently vanish.
pub fn identity_headers(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let required = IdentityRequirements {
        target: flags & 1 != 0,
        organisation: flags & 2 != 0,
        software: flags & 4 != 0,
    };
    let encode = flags & 8 != 0;
    let mut headers = HeaderMap::new();
    for (i, chunk) in rest.split(|&b| b == b'\n').take(8).enumerate() {
        let value = if encode {
            HeaderValue::from_str(&STANDARD.encode(chunk))
        } else {
            HeaderValue::from_bytes(chunk)
        };
        if let Ok(value) = value {
            headers.append(IDENTITY_HEADERS[i % 4], value);
        }
    }
    let policy = IdentityPolicy {
        required,
        strict: flags & 16 == 0,
        target_needed: flags & 32 != 0,
    };
    let Ok(decoded) = read_identity_headers(&headers, policy) else {
        return;
    };
    let warned = |header: &str| decoded.warnings.iter().any(|w| w.header == header);
    assert!(!policy.strict || decoded.warnings.is_empty());
    assert!(!policy.target_needed || !warned(NHSD_TARGET_IDENTIFIER));
    assert!(!required.target || decoded.target.is_some() || warned(NHSD_TARGET_IDENTIFIER));
    assert!(
        !required.organisation
            || decoded.organisation.is_some()
            || warned(NHSD_END_USER_ORGANISATION)
    );
    assert!(!required.software || decoded.software.is_some() || warned(NHSD_REQUESTING_SOFTWARE));
    if let Some(target) = &decoded.target {
        assert!(!target.system.contains('|'), "ambiguous route key");
        assert!(
            HeaderValue::from_str(&target.to_string()).is_ok(),
            "X-BaRS-Target would be dropped: {target:?}"
        );
    }
    if let Some(organisation) = &decoded.organisation {
        assert!(
            HeaderValue::from_str(organisation.ods_code.as_str()).is_ok(),
            "X-BaRS-Ods-Code would be dropped: {:?}",
            organisation.ods_code
        );
    }
}

/// `read_proxy_header` over the input, delivered in reads of at most N bytes.
///
/// Input: one byte N (0 = no limit), then the stream. Small reads exercise the v1 reader's
/// byte-counting loop the way a slow balancer would.
///
/// Asserts that the reader never consumes more than the longest header it accepts (the TLS
/// ClientHello follows on the same stream), and that an accepted header was consumed exactly:
/// a v1 line up to and including its only CRLF, a v2 header up to its announced length.
pub fn proxy_header(data: &[u8]) {
    let Some((&max_read, stream)) = data.split_first() else {
        return;
    };
    let mut reader = ChunkedReader {
        rest: stream,
        max_read: if max_read == 0 {
            usize::MAX
        } else {
            usize::from(max_read)
        },
    };
    let result = with_runtime(|rt| rt.block_on(read_proxy_header(&mut reader)));
    let consumed = &stream[..stream.len() - reader.rest.len()];
    let v1 = stream.starts_with(b"PROXY ");
    // The reader commits to v2 on the signature's first 6 bytes and reads the 16-byte fixed part
    // before it can check the rest; only a whole signature may be accepted.
    let v2_start = stream.starts_with(&V2_SIGNATURE[..6]);
    let v2 = stream.starts_with(V2_SIGNATURE);
    let most = if v1 {
        107
    } else if v2_start {
        16 + V2_MAX_PAYLOAD
    } else {
        6
    };
    assert!(
        consumed.len() <= most,
        "read {} bytes, more than any header",
        consumed.len()
    );
    let Ok(header) = result else {
        return;
    };
    if v1 {
        assert!(
            consumed.ends_with(b"\r\n"),
            "v1 header read past or short of its CRLF"
        );
        let first_crlf = consumed.windows(2).position(|w| w == b"\r\n");
        assert_eq!(
            first_crlf,
            Some(consumed.len() - 2),
            "v1 read past its CRLF"
        );
    } else {
        assert!(
            v2,
            "accepted something that is neither v1 nor v2: {header:?}"
        );
        let announced = usize::from(u16::from_be_bytes([consumed[14], consumed[15]]));
        assert_eq!(
            consumed.len(),
            16 + announced,
            "v2 read past or short of its length"
        );
    }
}

/// `config::parse` over the input as TOML text (non-UTF-8 inputs are skipped: `config::load`
/// reads the file with `read_to_string`, which refuses them first).
///
/// For a config that parses, also builds what `Gateway::bind` derives from it without I/O
/// (admission policy, route table, upstream clients), since the validated settings promise
/// those steps cannot fail; and renders every error, as `check` does.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match bars_gateway::config::parse(text, Path::new("/nonexistent/fuzz/config.toml")) {
        Ok(settings) => {
            let _ = bars_gateway::admission::AdmissionPolicy::from_settings(
                &settings.client,
                &settings.listen,
            );
            let _ = bars_gateway::reload::watched_files(&settings);
            let _ = bars_gateway::bars::routes::RouteTable::new(
                &settings.bars.base_path,
                settings.bars.bars_endpoints,
                settings.bars.extra_prefixes.clone(),
            );
            with_runtime(|rt| {
                let _entered = rt.enter();
                let _ = bars_gateway::upstream::Upstreams::new(&settings.upstream, None);
            });
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
        }
    }
}

/// Which TLS file the input replaces; the other files stay valid, so the loader gets as far as
/// the input lets it.
const MATERIAL_SLOTS: u8 = 5;

/// `tls::load` (every loader and parser of certificates, keys, CAs, CRLs and PKCS#12 bundles, then
/// the rustls configuration build) with one file replaced by the input.
///
/// Input: one byte choosing the file (mod 5: server chain, private key, client CA, CRL, PKCS#12
/// bundle), then the file's content. Encrypted keys and bundles are tried with the password
/// `fuzz`. The other files come from `write_demo_pki`, made once per process.
///
/// Asserts that a load that succeeds has a leaf certificate (`LoadedTls::server_leaf` indexes
/// it) and that every summary `check` prints can be rendered.
pub fn tls_material(data: &[u8]) {
    let Some((&slot, content)) = data.split_first() else {
        return;
    };
    MATERIAL.with(|material| {
        // Safe to unwrap: the directory is ours and was writable a moment ago; a failure here is
        // the machine's problem, not a finding.
        std::fs::write(&material.input, content).expect("write the fuzz input");
        let settings = &material.settings[usize::from(slot % MATERIAL_SLOTS)];
        if let Ok(loaded) = bars_gateway::tls::load(&settings.tls, &settings.client) {
            let now = bars_gateway::tls::inspect::unix_now();
            let leaf = loaded.server_leaf();
            let _ = (leaf.display_name(), leaf.days_left(now), leaf.sha256_hex());
            for summary in loaded
                .server_chain
                .iter()
                .chain(loaded.client_cas.iter().map(|(_, s)| s))
            {
                let _ = bars_gateway::tls::inspect::format_time(summary.not_after);
                let _ = summary.days_left(now);
            }
            for (_, crl) in &loaded.crls {
                let _ = bars_gateway::tls::inspect::format_time(crl.this_update);
                let _ = crl.next_update.map(bars_gateway::tls::inspect::format_time);
            }
        }
    });
}

/// A valid PKI and one config per [`MATERIAL_SLOTS`], each naming the input file in one place.
struct Material {
    _dir: tempfile::TempDir,
    input: PathBuf,
    settings: Vec<Settings>,
}

impl Material {
    fn new() -> Material {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        bars_gateway::demo::pki::write_demo_pki(d, "fuzz-client").expect("demo PKI");
        std::fs::write(d.join("password"), "fuzz\n").expect("password file");
        let identity_pem = |certificate: &str, key: &str| {
            format!(
                "certificate = \"{certificate}\"\nprivate_key = \"{key}\"\n\
                 private_key_password_file = \"password\"\n"
            )
        };
        let pem = identity_pem("server-chain.pem", "server.key");
        let slots = [
            (identity_pem("input", "server.key"), "", ""),
            (identity_pem("server-chain.pem", "input"), "", ""),
            (pem.clone(), "\"input\", ", ""),
            (pem.clone(), "", "\"input\""),
            (
                "pkcs12 = \"input\"\npkcs12_password_file = \"password\"\n".to_string(),
                "",
                "",
            ),
        ];
        let settings = slots
            .iter()
            .map(|(identity, extra_ca, crl)| {
                let text = format!(
                    "[listen]\naddress = \"127.0.0.1:0\"\n\n[tls]\n{identity}\
                     client_ca = [{extra_ca}\"root.pem\", \"sub-ca.pem\"]\nclient_crl = [{crl}]\n\n\
                     [client]\nenvironment = \"custom\"\nallowed_ips = [\"127.0.0.1/32\"]\n\
                     allowed_subjects = [\"fuzz-client\"]\n\n\
                     [upstream]\nurl = \"http://127.0.0.1:9\"\n"
                );
                bars_gateway::config::parse(&text, &d.join("config.toml"))
                    .unwrap_or_else(|e| panic!("the fuzz harness's own config is invalid: {e}"))
            })
            .collect();
        Material {
            input: d.join("input"),
            _dir: dir,
            settings,
        }
    }
}

thread_local! {
    static MATERIAL: Material = Material::new();
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

fn with_runtime<T>(run: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    RUNTIME.with(run)
}

/// An in-memory stream that hands out at most `max_read` bytes per read, then EOF.
struct ChunkedReader<'a> {
    rest: &'a [u8],
    max_read: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.rest.len().min(self.max_read).min(buf.remaining());
        let (head, tail) = self.rest.split_at(n);
        buf.put_slice(head);
        self.rest = tail;
        Poll::Ready(Ok(()))
    }
}
