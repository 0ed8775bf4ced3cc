//! JSON log lines, written straight into the line buffer.
//!
//! The output has the shape of `tracing-subscriber`'s JSON format with
//! `flatten_event` and the current span: `timestamp`, `level`, `message`
//! and the event's fields, `target`, then `span` (the innermost span's
//! fields and `name`) and `spans` (all of them, outermost first).
//!
//! Why not that format itself: it keeps each span's fields as a JSON
//! object text, so every `span.record` parses and re-serialises the
//! object, and every event parses it again, twice (for `span` and for
//! `spans`). With one `info` line per refund and a span whose fields are
//! recorded as they become known, that was a fifth of a refund's CPU at the
//! default level (0.120 → 0.150 ms per refund in `refund-worker bench` at
//! prefetch 64). Here a span's fields are kept as the inside of a JSON
//! object (`"k":v,"k2":v2`), a recorded field is appended, and an event
//! copies the text. (A field recorded twice then appears twice; JSON
//! readers keep the last. Our spans record each field once.)

use std::fmt::{self, Write};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// Formats a span's fields as the inside of a JSON object, so that a
/// later field is appended and an event copies them without parsing.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = JsonVisitor::new(&mut writer, true);
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut writer = current.as_writer();
        let mut visitor = JsonVisitor::new(&mut writer, first);
        fields.record(&mut visitor);
        visitor.result
    }
}

/// The event formatter: one JSON object per line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct JsonLines;

impl<S> FormatEvent<S, JsonSpanFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events from the `log` crate (sled's) carry their real target
        // in `log.*` fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut visitor = JsonVisitor::new(&mut writer, false);
        event.record(&mut visitor);
        visitor.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        let current = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = current {
            writer.write_str(",\"span\":")?;
            write_span(&mut writer, &span)?;
            writer.write_str(",\"spans\":[")?;
            for (i, span) in span.scope().from_root().enumerate() {
                if i > 0 {
                    writer.write_char(',')?;
                }
                write_span(&mut writer, &span)?;
            }
            writer.write_char(']')?;
        }
        writer.write_str("}\n")
    }
}

/// `{` the span's recorded fields `,"name":` its name `}`.
fn write_span<'a, R: LookupSpan<'a>>(
    writer: &mut Writer<'_>,
    span: &SpanRef<'a, R>,
) -> fmt::Result {
    writer.write_char('{')?;
    let extensions = span.extensions();
    if let Some(fields) = extensions.get::<FormattedFields<JsonSpanFields>>() {
        if !fields.fields.is_empty() {
            writer.write_str(&fields.fields)?;
            writer.write_char(',')?;
        }
    }
    writer.write_str("\"name\":")?;
    write_json_str(writer, span.name())?;
    writer.write_char('}')
}

/// Writes each field as `"name":value`, separated by commas; a comma comes
/// first unless `first`. `log.*` fields (metadata of `log` records) are
/// left out, as `tracing-subscriber` does.
struct JsonVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl<'a, 'w> JsonVisitor<'a, 'w> {
    fn new(writer: &'a mut Writer<'w>, first: bool) -> Self {
        JsonVisitor {
            writer,
            first,
            result: Ok(()),
        }
    }

    /// The key and its separator; `false` when the field is left out.
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_err() || field.name().starts_with("log.") {
            return false;
        }
        let separator = if self.first { "" } else { "," };
        self.first = false;
        self.result = self
            .writer
            .write_str(separator)
            .and_then(|()| write_json_str(self.writer, field.name()))
            .and_then(|()| self.writer.write_char(':'));
        self.result.is_ok()
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.key(field) {
            self.result = self.writer.write_fmt(value);
        }
    }
}

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.result = write_json_str(self.writer, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.result = self.writer.write_char('"').and_then(|()| {
                write!(
                    Escaping {
                        inner: &mut *self.writer
                    },
                    "{value:?}"
                )
                .and_then(|()| self.writer.write_char('"'))
            });
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            // JSON has no NaN or infinity.
            self.record_str(field, &value.to_string());
        }
    }
}

/// A quoted JSON string.
fn write_json_str(writer: &mut impl Write, s: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaping { inner: writer }.write_str(s)?;
    writer.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string, so that
/// `Debug` output is escaped as it is formatted, without a copy.
struct Escaping<'a, W: Write + ?Sized> {
    inner: &'a mut W,
}

impl<W: Write + ?Sized> Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            let escaped = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if (c as u32) < 0x20 => "",
                _ => continue,
            };
            self.inner.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.inner, "\\u{:04x}", c as u32)?;
            } else {
                self.inner.write_str(escaped)?;
            }
            plain = i + c.len_utf8();
        }
        self.inner.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(body: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonSpanFields)
            .event_format(JsonLines)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, body);
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn an_event_is_one_json_object_with_its_span_fields_recorded_later() {
        let lines = logged(|| {
            let outer = tracing::info_span!("outer", n = 7_u64);
            let _outer = outer.enter();
            let span =
                tracing::info_span!("delivery", refund_id = tracing::field::Empty, tag = 26_u64);
            span.record("refund_id", "rf-\"quoted\"\n\u{1}é");
            let _entered = span.enter();
            tracing::info!(
                status = "succeeded",
                attempts = 1_u32,
                ok = true,
                share = 0.5,
                odd = f64::NAN,
                error = ?Some("x"),
                "refund outcome"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "refund outcome");
        assert_eq!(line["status"], "succeeded");
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["ok"], true);
        assert_eq!(line["share"], 0.5);
        assert_eq!(line["odd"], "NaN");
        assert_eq!(line["error"], "Some(\"x\")");
        assert_eq!(line["target"], module_path!());
        assert!(line["timestamp"].as_str().expect("a string").ends_with('Z'));
        let span = &line["span"];
        assert_eq!(span["name"], "delivery");
        assert_eq!(span["refund_id"], "rf-\"quoted\"\n\u{1}é");
        assert_eq!(span["tag"], 26);
        let spans = line["spans"].as_array().expect("an array");
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0]["name"], "outer");
        assert_eq!(spans[0]["n"], 7);
        assert_eq!(&spans[1], span);
    }

    #[test]
    fn a_log_record_keeps_its_own_target_and_no_log_fields() {
        use tracing_log::log;
        let lines = logged(|| {
            let record = log::Record::builder()
                .args(format_args!("pagecache started"))
                .level(log::Level::Warn)
                .target("sled::pagecache")
                .module_path(Some("sled::pagecache"))
                .file(Some("pagecache.rs"))
                .line(Some(7))
                .build();
            tracing_log::format_trace(&record).expect("dispatched");
        });
        assert_eq!(lines.len(), 1);
        let line = lines[0].as_object().expect("an object");
        assert_eq!(line["target"], "sled::pagecache");
        assert_eq!(line["message"], "pagecache started");
        assert_eq!(line["level"], "WARN");
        assert!(line.keys().all(|k| !k.starts_with("log.")), "{line:?}");
    }

    #[test]
    fn an_event_outside_spans_and_a_span_without_fields() {
        let lines = logged(|| {
            tracing::warn!("no span");
            let span = tracing::info_span!("bare", later = tracing::field::Empty);
            let _entered = span.enter();
            tracing::error!("in a bare span");
            span.record("later", 3_i64);
            tracing::error!("after a record");
        });
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["level"], "WARN");
        assert!(lines[0].get("span").is_none() && lines[0].get("spans").is_none());
        assert_eq!(lines[1]["span"], serde_json::json!({"name": "bare"}));
        assert_eq!(
            lines[2]["span"],
            serde_json::json!({"later": 3, "name": "bare"})
        );
    }
}
