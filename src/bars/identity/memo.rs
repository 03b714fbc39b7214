//! The per-thread memo of identity header values that decoded cleanly: a sender repeats its
//! identity headers verbatim, so a hit skips Base64, JSON and the shape rules.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::thread::LocalKey;

use http::HeaderValue;

use super::{EndUserOrganisation, Problem, RequestingSoftware, TargetIdentifier};

/// Slots of each per-thread memo of valid identity header values (direct-mapped by hash).
pub(super) const MEMO_SLOTS: usize = 64;
/// Longest value memoised: the spec's examples are under 400 bytes. Bounds a thread's memos to
/// 4 × 64 × 1 KiB whatever senders send.
pub(super) const MEMO_MAX_LEN: usize = 1024;

/// Valid values seen on this thread, per header, with what they decoded to. A sender repeats its
/// identity headers verbatim (one clinician's booking is several requests, the sending system's
/// `NHSD-Requesting-Software` never changes), so a hit is a hash and a byte comparison instead of
/// Base64 + JSON + shape rules (about 5 µs for the four; BENCHMARKS.md). Only values that decoded
/// cleanly are kept, with the mode they were read in, and a hit needs the very same bytes and
/// mode, so the answer is always what decoding would give.
pub(super) struct Memo<T> {
    slots: Vec<Option<MemoEntry<T>>>,
}

/// A memo slot: the raw value, whether it was read in strict mode, and what it decoded to.
type MemoEntry<T> = (Box<[u8]>, bool, T);

impl<T> Memo<T> {
    fn new() -> Self {
        Memo {
            slots: std::iter::repeat_with(|| None).take(MEMO_SLOTS).collect(),
        }
    }
}

pub(super) type MemoKey<T> = LocalKey<RefCell<Memo<T>>>;

thread_local! {
    pub(super) static TARGET_MEMO: RefCell<Memo<TargetIdentifier>> = RefCell::new(Memo::new());
    pub(super) static ORGANISATION_MEMO: RefCell<Memo<EndUserOrganisation>> = RefCell::new(Memo::new());
    pub(super) static SOFTWARE_MEMO: RefCell<Memo<RequestingSoftware>> = RefCell::new(Memo::new());
    pub(super) static PRACTITIONER_MEMO: RefCell<Memo<()>> = RefCell::new(Memo::new());
}

/// `decode(value, strict)`, answered from this thread's memo when the same bytes decoded cleanly
/// before in the same mode.
pub(super) fn memoised<T: Clone>(
    memo: &'static MemoKey<T>,
    value: &HeaderValue,
    strict: bool,
    decode: fn(&HeaderValue, bool) -> Result<T, Problem>,
) -> Result<T, Problem> {
    let bytes = value.as_bytes();
    if bytes.len() > MEMO_MAX_LEN {
        return decode(value, strict);
    }
    let slot = (BuildHasherDefault::<DefaultHasher>::default().hash_one(bytes) % MEMO_SLOTS as u64)
        as usize;
    let hit = memo.with_borrow(|m| match &m.slots[slot] {
        Some((raw, mode, decoded)) if **raw == *bytes && *mode == strict => Some(decoded.clone()),
        _ => None,
    });
    if let Some(decoded) = hit {
        return Ok(decoded);
    }
    let decoded = decode(value, strict)?;
    memo.with_borrow_mut(|m| m.slots[slot] = Some((bytes.into(), strict, decoded.clone())));
    Ok(decoded)
}
