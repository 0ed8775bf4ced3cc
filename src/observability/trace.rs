//! W3C trace context across the broker. A command's `traceparent` (and
//! `tracestate`) AMQP headers make the refund's span a child of the caller's
//! span: the refund gets a span id of its own under the caller's trace id.
//! The outcome events and dead letters of that delivery carry the refund
//! span's context in the same headers, and so does the provider request
//! when the account enables it (`providers.<name>.propagate_trace`).
//!
//! The context of the delivery being processed is task-local (set by the
//! pipeline around each delivery), so the publisher and the provider call
//! read it without every stage passing it on. A malformed `traceparent` is
//! ignored (debug log): tracing never rejects a refund.

use lapin::types::{AMQPValue, FieldTable};

/// `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// One span's W3C context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Trace flags (`01`: sampled).
    pub flags: u8,
    /// Vendor state, passed on as received.
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

impl TraceContext {
    /// Parses a `traceparent` value (version 00, or a later version read
    /// as 00); `None` when malformed or all-zero.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace_id, span_id, flags, ..] = parts.as_slice() else {
            return None;
        };
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || *version == "ff" || (*version == "00" && parts.len() != 4) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(TraceContext {
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            flags: u8::from_str_radix(flags, 16).ok()?,
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 512)
                .map(str::to_string),
        })
    }

    /// The caller's context from a command's headers, if well-formed.
    pub fn from_headers(headers: Option<&FieldTable>) -> Option<Self> {
        let headers = headers?;
        let text = |key: &str| match headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        };
        let traceparent = text(TRACEPARENT)?;
        let parsed = Self::parse(&traceparent, text(TRACESTATE).as_deref());
        if parsed.is_none() {
            tracing::debug!(%traceparent, "malformed traceparent ignored");
        }
        parsed
    }

    /// A child span of `parent`, or the root of a new trace.
    pub fn child_of(parent: Option<&TraceContext>) -> Self {
        match parent {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id.clone(),
                span_id: random_hex(8),
                flags: parent.flags,
                tracestate: parent.tracestate.clone(),
            },
            None => TraceContext {
                trace_id: random_hex(16),
                span_id: random_hex(8),
                flags: 1,
                tracestate: None,
            },
        }
    }

    /// The `traceparent` value of this span.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    /// Writes `traceparent` (and `tracestate`) into AMQP headers.
    pub fn write(&self, headers: &mut FieldTable) {
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(self.traceparent().into()),
        );
        if let Some(state) = &self.tracestate {
            headers.insert(
                TRACESTATE.into(),
                AMQPValue::LongString(state.as_str().into()),
            );
        }
    }

    /// This context as an OpenTelemetry parent (for the OTLP exporter).
    pub fn otel_parent(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let span_context = SpanContext::new(
            TraceId::from_hex(&self.trace_id).unwrap_or(TraceId::INVALID),
            SpanId::from_hex(&self.span_id).unwrap_or(SpanId::INVALID),
            TraceFlags::new(self.flags),
            true,
            self.tracestate
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default(),
        );
        opentelemetry::Context::new().with_remote_span_context(span_context)
    }

    /// The context OpenTelemetry gave `span` (when exporting), keeping the
    /// caller's `tracestate`; `None` when it has none.
    pub fn of_span(span: &tracing::Span, tracestate: Option<String>) -> Option<Self> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let context = span.context();
        let span_ref = context.span();
        let sc = span_ref.span_context();
        sc.is_valid().then(|| TraceContext {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            flags: sc.trace_flags().to_u8(),
            tracestate,
        })
    }

    /// Runs `work` with this context as the current one.
    pub async fn scope<F: std::future::Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// The context of the delivery being processed, if any.
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

fn random_hex(bytes: usize) -> String {
    // Trace ids must be unique, not secret: a per-thread SplitMix64 seeded
    // once from the OS saves a system call per id on the hot path (two per
    // refund). Secrets (callback tokens) still come from the OS each time.
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            u64::from_le_bytes(seed) | 1
        });
    }
    let mut buf = Vec::with_capacity(bytes + 8);
    while buf.len() < bytes {
        let word = STATE.with(|state| {
            let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            state.set(next);
            let mut z = next;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        });
        buf.extend_from_slice(&word.to_le_bytes());
    }
    buf.truncate(bytes);
    if buf.iter().all(|b| *b == 0) {
        buf[0] = 1;
    }
    crate::contract::command::hex(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_w3c_example_and_makes_a_child() {
        let parent = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(parent.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = TraceContext::child_of(Some(&parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let text = child.traceparent();
        assert_eq!(
            TraceContext::parse(&text, None)
                .expect("round trip")
                .span_id,
            child.span_id
        );
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
            None
        )
        .is_some());
    }
}
