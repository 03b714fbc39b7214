//! Log output: `[log]` level and format, written to stderr so that an operator sees what matters
//! wherever the gateway runs.
//!
//! - Under systemd (stderr connected to the journal, which systemd announces in
//!   `$JOURNAL_STREAM`), each line starts with its sd-daemon priority prefix (`<3>` ERROR, `<4>`
//!   WARN, `<6>` INFO, `<7>` DEBUG and TRACE; sd-daemon(3)), so `journalctl -p warning` and the
//!   journal's colouring show WARN and ERROR as such instead of every line at the default INFO.
//! - `format = "text"` writes ANSI colour codes only when stderr is a terminal: in a file, a
//!   pipe or the journal they are noise that breaks grep.

use std::io::{IsTerminal as _, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// Level or `tracing` filter directive, e.g. `info` or `info,bars_gateway=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
    /// One audit record per request.
    pub audit: bool,
}

/// Installs the global `tracing` subscriber from `[log]`; `RUST_LOG`, when set, overrides the level.
pub(crate) fn init(log: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(&log.level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    let journald = stderr_is_the_journal();
    let writer = StderrWriter { journald };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!journald && std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The sd-daemon(3) priority prefix for a level (syslog priorities: 3 err, 4 warning, 6 info,
/// 7 debug).
pub(crate) fn priority_prefix(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        Level::DEBUG | Level::TRACE => b"<7>",
    }
}

/// Whether `$JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd for a service whose stderr is the
/// journal) names this process's stderr. A child that inherited the variable but writes
/// elsewhere does not match.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    journal_stream_matches(&stream.to_string_lossy(), meta.dev(), meta.ino())
}

/// Whether a `$JOURNAL_STREAM` value names the file with this device and inode.
pub(crate) fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// Makes a stderr writer per event, with the journal priority prefix when stderr is the journal.
#[derive(Debug, Clone, Copy)]
struct StderrWriter {
    journald: bool,
}

/// One event's output: the fmt layer formats a whole line and hands it over in one `write_all`,
/// so the prefix goes in front of the first write.
struct PrefixedLine {
    prefix: &'static [u8],
    at_line_start: bool,
}

impl Write for PrefixedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stderr = std::io::stderr().lock();
        if self.at_line_start && !self.prefix.is_empty() {
            // One write for prefix and line, so concurrent events cannot interleave between them.
            let mut line = Vec::with_capacity(self.prefix.len() + buf.len());
            line.extend_from_slice(self.prefix);
            line.extend_from_slice(buf);
            stderr.write_all(&line)?;
        } else {
            stderr.write_all(buf)?;
        }
        self.at_line_start = buf.ends_with(b"\n");
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for StderrWriter {
    type Writer = PrefixedLine;

    fn make_writer(&'a self) -> PrefixedLine {
        PrefixedLine {
            prefix: if self.journald { b"<6>" } else { b"" },
            at_line_start: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> PrefixedLine {
        PrefixedLine {
            prefix: if self.journald {
                priority_prefix(meta.level())
            } else {
                b""
            },
            at_line_start: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_and_error_get_the_journal_priorities() {
        assert_eq!(priority_prefix(&Level::ERROR), b"<3>");
        assert_eq!(priority_prefix(&Level::WARN), b"<4>");
        assert_eq!(priority_prefix(&Level::INFO), b"<6>");
        assert_eq!(priority_prefix(&Level::DEBUG), b"<7>");
    }

    #[test]
    fn journal_stream_must_name_this_stderr() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("garbage", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
    }
}
