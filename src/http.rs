//! The worker's HTTP listener: `/healthz` (the process is alive) and
//! `/readyz` (broker connected and consumer running; the store is open for as
//! long as the process runs).

use crate::shutdown::Shutdown;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, health: Arc<Health>, mut shutdown: Shutdown) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await;
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let body = serde_json::json!({
        "broker_connected": health.broker.load(Ordering::Relaxed),
        "consuming": health.consuming.load(Ordering::Relaxed),
        "store_open": true,
    });
    let status = if health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
