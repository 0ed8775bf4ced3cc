//! The worker's HTTP listeners.
//!
//! * The private listener (`http.addr`): `/healthz` (the process is alive),
//!   `/readyz` (broker connected and consumer running), `/metrics`
//!   (Prometheus) and the operator API under `/refunds` (see `operator.rs`),
//!   which needs the bearer token `http.operator_token`.
//! * The public listener (`http.callback_addr`): provider callbacks only
//!   (see `callbacks.rs`). When it is not configured, callbacks are served
//!   on the private listener; the operator API still needs its token.
//!
//! A path that a listener does not serve answers 404 there, so an operator
//! path on the public listener and a callback path on the private one (when
//! both listeners exist) are simply not found.

mod callbacks;
mod console;
mod operator;

use crate::service::shutdown::Shutdown;
use crate::values::secret::Secret;
use crate::worker::Worker;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Readiness flags, set by the broker session.
#[derive(Debug, Default)]
pub struct Health {
    broker: AtomicBool,
    consuming: AtomicBool,
}

impl Health {
    /// Broker connection up or down.
    pub fn set_broker(&self, up: bool) {
        self.broker.store(up, Ordering::Relaxed);
    }
    /// Consumer running or not.
    pub fn set_consuming(&self, up: bool) {
        self.consuming.store(up, Ordering::Relaxed);
    }
    /// Whether the worker is taking deliveries.
    pub fn ready(&self) -> bool {
        self.broker.load(Ordering::Relaxed) && self.consuming.load(Ordering::Relaxed)
    }
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    worker: Worker,
    /// `None`: the operator API is off.
    operator_token: Option<Secret>,
    callback_max_body: usize,
    callback_timeout: Duration,
}

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Health, readiness, metrics, operator API.
    pub private: TcpListener,
    /// Provider callbacks, when configured apart.
    pub callbacks: Option<TcpListener>,
}

/// Serves until shutdown.
pub async fn serve(listeners: Listeners, health: Arc<Health>, worker: Worker, shutdown: Shutdown) {
    crate::observability::metrics::install();
    let settings = worker.settings();
    let state = AppState {
        operator_token: settings.operator_token().cloned(),
        callback_max_body: usize::try_from(settings.http.callback_max_body_bytes)
            .unwrap_or(usize::MAX),
        callback_timeout: Duration::from_millis(settings.http.callback_timeout_ms),
        health,
        worker,
    };
    let private = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(operator::routes(state.clone()))
        .merge(console::routes(state.clone()));
    match listeners.callbacks {
        Some(public) => {
            let public_app = callbacks::routes().with_state(state.clone());
            let private_app = private.with_state(state);
            let mut stop = shutdown.clone();
            let public_task = tokio::spawn(async move {
                let _ = axum::serve(public, public_app)
                    .with_graceful_shutdown(async move { stop.triggered().await })
                    .await;
            });
            run(listeners.private, private_app, shutdown).await;
            let _ = public_task.await;
        }
        None => {
            let app = private.merge(callbacks::routes()).with_state(state);
            run(listeners.private, app, shutdown).await;
        }
    }
}

async fn run(listener: TcpListener, app: Router, mut shutdown: Shutdown) {
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await;
}

async fn metrics(State(state): State<AppState>) -> String {
    let store_healthy = state.worker.store().healthy();
    crate::observability::metrics::readiness(state.health.ready() && store_healthy, store_healthy);
    crate::observability::metrics::render()
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = &state.health;
    // An open breaker is reported, not a reason to be unready: the other
    // accounts' refunds go on.
    let providers: serde_json::Map<String, serde_json::Value> = state
        .worker
        .providers()
        .gates()
        .map(|(name, gate)| {
            (
                name.clone(),
                serde_json::json!({
                    "breaker": gate.breaker_state().as_str(),
                    "waiting_at_limits": gate.waiting(),
                }),
            )
        })
        .collect();
    let body = serde_json::json!({
        "broker_connected": health.broker.load(Ordering::Relaxed),
        "consuming": health.consuming.load(Ordering::Relaxed),
        "store_open": state.worker.store().healthy(),
        "store_backend": state.worker.store().backend(),
        "providers": providers,
    });
    let status = if health.ready() && state.worker.store().healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}
