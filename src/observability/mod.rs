//! What the worker tells about itself: logs and OTLP span export
//! ([`telemetry`]), the W3C trace context a refund carries ([`trace`]),
//! and the Prometheus metrics ([`metrics`]).

pub mod metrics;
pub mod telemetry;
pub mod trace;
