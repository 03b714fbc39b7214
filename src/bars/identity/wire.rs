//! Wire decoding of an identity header: length bound, standard Base64 (padding optional), UTF-8,
//! a nesting bound, then JSON read into small typed structs whose fields accept *any* JSON value
//! and record what they saw (`Text`, `Kind`, `Array`, `Object`, with hand-written serde visitors),
//! so that `rules.rs` can say precisely what is wrong.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use base64::Engine as _;
use http::HeaderValue;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{refused, shape, Problem};
use crate::bars::warnings::ShapeProblem;

/// Longest header value decoded. The spec's examples are under 400 bytes; the bound keeps a hostile
/// header from costing more than a few microseconds.
pub(super) const MAX_ENCODED_LEN: usize = 8 * 1024;
/// Decoded bytes kept on the stack: the spec's examples decode to under 300 bytes; larger values
/// (up to [`MAX_ENCODED_LEN`]) decode into a heap buffer instead.
const STACK_DECODE_CAPACITY: usize = 1024;
/// Deepest `[`/`{` nesting accepted. The deepest BaRS header (PractitionerRole `code[].coding[]`)
/// nests 5 deep; serde_json's own limit is 128, far more than any identity header needs.
const MAX_DEPTH: usize = 16;

/// Runs the shared steps (length, Base64, UTF-8, nesting) and hands the JSON text to `read`.
pub(super) fn with_decoded_json<T>(
    header: &'static str,
    value: &HeaderValue,
    read: impl FnOnce(&str) -> Result<T, Problem>,
) -> Result<T, Problem> {
    let raw = value.as_bytes();
    if raw.len() > MAX_ENCODED_LEN {
        return Err(refused(header, "is too long"));
    }
    // Proxies and hand-written clients leave spaces around the value; they are never Base64.
    let encoded = raw.trim_ascii();
    if encoded.is_empty() {
        return Err(refused(header, "is empty"));
    }
    // This runs on every request: typical values decode on the stack, without an allocation.
    let needed = base64::decoded_len_estimate(encoded.len());
    let mut stack = [0u8; STACK_DECODE_CAPACITY];
    let mut heap = Vec::new();
    let buffer: &mut [u8] = if needed <= STACK_DECODE_CAPACITY {
        &mut stack[..needed]
    } else {
        heap.resize(needed, 0);
        &mut heap
    };
    // Standard alphabet only: URL-safe `-`/`_` and anything else fail here (BARS-CONTEXT.md:
    // "accept standard Base64 with or without padding ... reject everything else").
    let len = STANDARD_PAD_INDIFFERENT
        .decode_slice(encoded, buffer)
        .map_err(|_| refused(header, "is not valid Base64"))?;
    let decoded = &buffer[..len];
    let json = std::str::from_utf8(decoded).map_err(|_| refused(header, "is not UTF-8"))?;
    check_nesting(json.as_bytes()).map_err(|()| refused(header, "is nested too deeply"))?;
    read(json)
}

/// Refuses JSON nested deeper than [`MAX_DEPTH`] in one pass over the bytes, before serde recurses.
fn check_nesting(json: &[u8]) -> Result<(), ()> {
    // Fast path (vectorised count): with no more opening brackets than the limit, in strings or
    // not, the nesting cannot exceed it. Real headers have under ten.
    if json.iter().filter(|&&b| b == b'[' || b == b'{').count() <= MAX_DEPTH {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses the text as a JSON object of shape `T`. Surrounding whitespace (the spec's examples end
/// in a newline) is JSON whitespace and accepted by serde_json.
pub(super) fn parse_object<'a, T: Deserialize<'a>>(
    header: &'static str,
    json: &'a str,
) -> Result<T, Problem> {
    match serde_json::from_str::<Object<T>>(json) {
        Ok(Object::Fields(fields)) => Ok(fields),
        Ok(Object::Other) => Err(shape(ShapeProblem::NotAnObject, "is not a JSON object").into()),
        // Every field type below accepts any JSON value, so the only data error left is a repeated
        // key, which serde's derive refuses: good, since a second copy could hide from a check
        // (in lenient mode nothing is read from such a header).
        Err(e) if e.is_data() => {
            Err(shape(ShapeProblem::DuplicateField, "has a duplicate JSON field").into())
        }
        // serde_json's own message is not used: it can quote the content.
        Err(_) => Err(refused(header, "is not valid JSON")),
    }
}

// ---- JSON shapes ------------------------------------------------------------------------------
// Unknown fields are ignored: FHIR resources carry more than the gateway reads.

#[derive(serde::Deserialize)]
pub(super) struct TargetJson<'a> {
    #[serde(borrow)]
    pub(super) system: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) value: Option<Text<'a>>,
}

#[derive(serde::Deserialize)]
pub(super) struct OrganisationJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub(super) resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    pub(super) name: Option<Kind>,
}

#[derive(serde::Deserialize)]
pub(super) struct SoftwareJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub(super) resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    #[serde(rename = "deviceName")]
    pub(super) device_name: Option<Kind>,
    pub(super) version: Option<Kind>,
}

#[derive(serde::Deserialize)]
pub(super) struct PractitionerJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub(super) resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    pub(super) code: Option<Kind>,
}

/// A FHIR Identifier: `{system?, value?}`.
#[derive(serde::Deserialize)]
pub(super) struct IdentifierJson<'a> {
    #[serde(borrow)]
    pub(super) system: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) value: Option<Text<'a>>,
}

impl IdentifierJson<'_> {
    /// The value (a string, or with `numbers` also an integer), or "" (entries are checked to
    /// hold such a value before this is used).
    pub(super) fn value_text(&self, numbers: bool) -> &str {
        self.value
            .as_ref()
            .and_then(|v| v.text(numbers))
            .unwrap_or("")
    }
}

/// Any JSON value, kept when it is a string (borrowed unless it contained escapes) or an integer
/// (as its decimal text: the proxy routes `"value": 2000011147`).
pub(super) enum Text<'a> {
    String(Cow<'a, str>),
    Integer(String),
    Other,
}

impl Text<'_> {
    /// The string, or with `numbers` also an integer's text.
    pub(super) fn text(&self, numbers: bool) -> Option<&str> {
        match self {
            Text::String(text) => Some(text),
            Text::Integer(text) if numbers => Some(text),
            Text::Integer(_) | Text::Other => None,
        }
    }
}

/// Any JSON value, reduced to its kind (contents skipped without allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    String,
    Object,
    Array,
    Other,
}

/// Any JSON value, read as `T` items when it is an array, as one `T` when it is an object.
pub(super) enum Array<T> {
    Items(Vec<T>),
    Single(T),
    Other,
}

/// Any JSON value, read as the struct `T` when it is an object.
pub(super) enum Object<T> {
    Fields(T),
    Other,
}

/// Visitor methods for the JSON scalars, all giving `$value`.
macro_rules! scalars_give {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

struct TextVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Text::Integer(n.to_string()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Text::Integer(n.to_string()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Owned(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Text::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| Text::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor(PhantomData))
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Kind::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Kind::String)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Kind::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| Kind::Object)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KindVisitor)
    }
}

struct ArrayVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ArrayVisitor<T> {
    type Value = Array<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Array::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Array::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Identifier arrays hold one or two entries in practice.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(2).min(8));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Array::Items(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        // FHIR says array; senders write a single identifier as an object (lenient mode reads it).
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Array::Single)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ArrayVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Object::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Object::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Object::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object::Fields)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}
