//! Logging and tracing, set up in one place. Text on a terminal, JSON
//! lines otherwise (or as configured; `json.rs` writes them); `RUST_LOG`
//! overrides the configured filter. With `telemetry.otlp_endpoint` set,
//! the refund spans are also exported over OTLP/HTTP (protobuf) through the
//! opentelemetry crates, with the caller's `traceparent` as their parent
//! (see `trace.rs`).

mod json;
mod otlp;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format (`log.format`; the configuration re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

static OTLP: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (then span ids come from OpenTelemetry).
pub fn otlp_enabled() -> bool {
    OTLP.load(Ordering::Relaxed)
}

/// What was set up; [`Telemetry::shutdown`] flushes the exporter.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporter.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "OTLP exporter did not shut down cleanly");
            }
        }
    }
}

/// Installs the global subscriber (once; later calls are ignored), logging
/// only.
pub fn init(format: LogFormat, filter: &str) {
    let _ = init_with(format, filter, None);
}

/// Where spans go: an OTLP/HTTP collector's base URL (`http://…:4318` or
/// `https://…`) and, for a collector whose certificate a private CA signed,
/// that CA's PEM file.
#[derive(Debug, Clone, Copy)]
pub struct Otlp<'a> {
    /// `telemetry.otlp_endpoint`.
    pub endpoint: &'a str,
    /// `telemetry.otlp_tls_ca_path`.
    pub ca: Option<&'a std::path::Path>,
}

/// As [`init`], exporting spans to `otlp` when given. Called on the
/// worker's runtime (the exporter's requests run on it).
pub fn init_with(
    format: LogFormat,
    filter: &str,
    otlp: Option<Otlp<'_>>,
) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.fmt_fields(json::JsonSpanFields)
            .event_format(json::JsonLines)
            .boxed()
    } else {
        fmt.boxed()
    };
    let provider = match otlp {
        None => None,
        Some(otlp) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(otlp::OtlpClient::new(otlp.ca)?)
                .with_endpoint(format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("refund-worker")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("refund-worker"))
            .boxed()
    });
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init()
        .is_ok()
    {
        OTLP.store(provider.is_some(), Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}
