//! The OTLP exporter's HTTP client: the worker's own reqwest (rustls, the
//! web PKI roots, plus a private CA when `telemetry.otlp_tls_ca_path`
//! names one), so that an `https://` collector works and only one HTTP
//! stack is built. The exporter calls it from its own thread; each request
//! runs as a task on the worker's runtime.

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use std::path::Path;
use std::time::Duration;

/// How long one export may take (connect, send, read the answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// An [`HttpClient`] on the worker's runtime.
#[derive(Debug, Clone)]
pub(super) struct OtlpClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl OtlpClient {
    /// A client trusting the web PKI and, when given, the CA(s) in `ca`.
    /// Must be called on the worker's runtime.
    pub(super) fn new(ca: Option<&Path>) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "telemetry.otlp_endpoint: no async runtime to export from".to_string())?;
        let mut builder = reqwest::Client::builder().timeout(EXPORT_TIMEOUT);
        if let Some(path) = ca {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "telemetry.otlp_tls_ca_path: cannot read {}: {e}",
                    path.display()
                )
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("telemetry.otlp_tls_ca_path: {}: {e}", path.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        Ok(OtlpClient { http, runtime })
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let http = self.http.clone();
        let exchange = async move {
            let (parts, body) = request.into_parts();
            let answer = http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let mut response = Response::builder().status(answer.status());
            if let Some(headers) = response.headers_mut() {
                *headers = answer.headers().clone();
            }
            let body = answer.bytes().await?;
            Ok::<_, HttpError>(response.body(body)?)
        };
        self.runtime.spawn(exchange).await?
    }
}
