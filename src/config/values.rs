//! The config's value types that TOML has no word for, read by serde: a duration like `"10s"`, a
//! size like `"64KiB"`; and, for every error serde reports, the dotted key it is about (found from
//! the error's position in the file), so that a wrong value names its key like every other check.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

/// A duration written like `"5s"`, `"2m"` or `"24h"` (humantime), greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub(crate) Duration);

impl HumanDuration {
    /// The value, or `default` when the key is absent.
    pub(crate) fn or(value: Option<Self>, default: Duration) -> Duration {
        value.map_or(default, |d| d.0)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a duration like \"5s\" or \"24h\"", |text| {
            let d = humantime::parse_duration(text.trim())
                .map_err(|e| format!("{text:?} is not a duration like \"5s\" or \"24h\": {e}"))?;
            if d.is_zero() {
                return Err("must be greater than zero".into());
            }
            Ok(HumanDuration(d))
        })
    }
}

/// A size in bytes written like `"32KiB"`, `"10MiB"`, `"1GiB"`, `"10MB"` or a plain byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteSize(pub(crate) u64);

impl ByteSize {
    /// The value, or `default` when the key is absent.
    pub(crate) fn or(value: Option<Self>, default: u64) -> u64 {
        value.map_or(default, |s| s.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a size like \"32KiB\" or \"10MiB\"", |text| {
            super::parse_size(text)
                .map(ByteSize)
                .ok_or_else(|| format!("{text:?} is not a size like \"32KiB\" or \"10MiB\""))
        })
    }
}

/// Deserializes a string with `parse`, whose error message becomes serde's.
fn from_text<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Text<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for Text<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(Text { expecting, parse })
}

/// The dotted key (`upstream.request_timeout`, `client.allowed_ips[0]`, `upstream.route[1].url`)
/// whose key or value covers `at`, a byte offset into `text`; the deepest one wins. `None` when the
/// text does not parse or nothing covers the offset.
pub(crate) fn key_at(text: &str, at: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    in_table(doc.get_ref(), at, "")
}

fn in_table(table: &DeTable<'_>, at: usize, prefix: &str) -> Option<String> {
    table.iter().find_map(|(k, v)| {
        let key = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        in_value(v.get_ref(), at, &key)
            .or_else(|| (covers(k.span(), at) || covers(v.span(), at)).then_some(key))
    })
}

fn in_value(value: &DeValue<'_>, at: usize, path: &str) -> Option<String> {
    match value {
        DeValue::Table(t) => in_table(t, at, path),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let key = format!("{path}[{i}]");
            in_value(item.get_ref(), at, &key).or_else(|| covers(item.span(), at).then_some(key))
        }),
        _ => None,
    }
}

fn covers(span: Range<usize>, at: usize) -> bool {
    span.contains(&at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_their_text() {
        #[derive(Deserialize)]
        struct T {
            d: HumanDuration,
            s: ByteSize,
        }
        let t: T = toml::from_str("d = \"2m\"\ns = \"64KiB\"").unwrap();
        assert_eq!(t.d.0, Duration::from_secs(120));
        assert_eq!(t.s.0, 64 * 1024);
        let e = toml::from_str::<T>("d = \"0s\"\ns = \"1\"").err().unwrap();
        assert_eq!(e.message(), "must be greater than zero");
        let e = toml::from_str::<T>("d = \"1s\"\ns = \"lots\"")
            .err()
            .unwrap();
        assert_eq!(
            e.message(),
            "\"lots\" is not a size like \"32KiB\" or \"10MiB\""
        );
    }

    #[test]
    fn the_key_at_an_offset_is_the_deepest_dotted_path() {
        let text = "[a]\nb = 1\nc = [\"x\", \"y\"]\n[[r]]\nu = 2\n[[r]]\nu = 3\n";
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(key_at(text, at("1")).as_deref(), Some("a.b"));
        assert_eq!(key_at(text, at("\"y\"")).as_deref(), Some("a.c[1]"));
        assert_eq!(key_at(text, at("3")).as_deref(), Some("r[1].u"));
        assert_eq!(key_at(text, at("c =")).as_deref(), Some("a.c"));
    }
}
