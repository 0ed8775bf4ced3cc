//! The worker's HTTP listener: `/healthz` (the process is alive), `/readyz`
//! (broker connected and consumer running; the store is open for as long as
//! the process runs), `/metrics` (Prometheus), and the operator API over the
//! store (the store is locked by the running worker, so operator tools go
//! through it):
//!
//! * `GET /refunds/{id}`: the record with its history.
//! * `GET /refunds?status=in_doubt&limit=100`: records by status.
//! * `POST /refunds/{id}/resolve`: settle an in-doubt refund
//!   (`{"executed": "<txn>", "performed": "refund"}` or
//!   `{"not_executed": true}`, with `by` and `reason`).
//! * `POST /refunds/{id}/abandon`: give up a not-sent or in-doubt refund
//!   (`failed`, `error.kind = abandoned`; `by`, `reason`).
//! * `POST /refunds/{id}/release`: release an over-refund reservation that
//!   nothing will settle (`by`, `reason`).
//!
//! Bind it to a private address: the resolve endpoint changes refunds.

use crate::shutdown::Shutdown;
use crate::store::Known;
use crate::store::RefundRecord;
use crate::worker::{record_status, CallbackError, Decision, Resolution, ResolveError, Worker};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
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

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    worker: Worker,
}

/// Serves until shutdown.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    worker: Worker,
    mut shutdown: Shutdown,
) {
    crate::metrics::install();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route("/refunds", get(list_refunds))
        .route("/refunds/{id}", get(show_refund))
        .route("/refunds/{id}/resolve", post(resolve_refund))
        .route("/refunds/{id}/abandon", post(abandon_refund))
        .route("/refunds/{id}/release", post(release_refund))
        .route("/callbacks/paynet/{id}/{token}", post(paynet_callback))
        .with_state(AppState { health, worker });
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await;
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = &state.health;
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

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn show_refund(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.worker.store().lookup(&id) {
        Ok(Some(Known::Record(record))) => Json(record).into_response(),
        // A pruned refund: what is left of it, in the record's shape.
        Ok(Some(Known::Tombstone(t))) => Json(serde_json::json!({
            "refund_id": id,
            "payload_hash": t.payload_hash,
            "state": { "state": "tombstone", "status": t.status, "event_id": t.event_id,
                       "performed": t.performed, "provider_transaction_id": t.provider_transaction_id },
            "attempts": t.attempts,
            "updated_at": t.pruned_at,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no refund {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_refunds(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let store = state.worker.store().clone();
    let limit = q.limit.unwrap_or(1000);
    let listed = tokio::task::spawn_blocking(move || {
        let mut out: Vec<RefundRecord> = Vec::new();
        for record in store.records() {
            let record = record?;
            if q.status
                .as_deref()
                .is_none_or(|s| s == record_status(&record))
            {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok::<_, crate::store::StoreError>(out)
    })
    .await;
    match listed {
        Ok(Ok(records)) => Json(records).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn decision_error(e: ResolveError) -> Response {
    let status = match &e {
        ResolveError::NotFound(_) => StatusCode::NOT_FOUND,
        ResolveError::WrongState { .. } => StatusCode::CONFLICT,
        ResolveError::Invalid(_) => StatusCode::BAD_REQUEST,
        ResolveError::Publish(_) => StatusCode::BAD_GATEWAY,
        ResolveError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn abandon_refund(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(decision): Json<Decision>,
) -> Response {
    match state.worker.abandon(&id, decision).await {
        Ok(record) => Json(record).into_response(),
        Err(e) => decision_error(e),
    }
}

async fn release_refund(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(decision): Json<Decision>,
) -> Response {
    match state.worker.release(&id, decision).await {
        Ok(released) => {
            Json(serde_json::json!({ "refund_id": id, "released": released })).into_response()
        }
        Err(e) => decision_error(e),
    }
}

async fn resolve_refund(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(resolution): Json<Resolution>,
) -> Response {
    match state.worker.resolve(&id, resolution).await {
        Ok(record) => Json(record).into_response(),
        Err(e) => decision_error(e),
    }
}

async fn paynet_callback(
    State(state): State<AppState>,
    Path((id, token)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match state.worker.paynet_callback(&id, &token, &body).await {
        Ok(outcome) => Json(serde_json::json!({ "ok": true, "outcome": format!("{outcome:?}") }))
            .into_response(),
        Err(e @ CallbackError::NotFound) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ CallbackError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        // Non-2xx makes the provider try again; the record is already final.
        Err(e @ CallbackError::Publish(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ CallbackError::Store(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
