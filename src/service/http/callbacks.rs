//! Provider callbacks, the one part of the worker that must be reachable
//! from outside: Paynet posts a refund's final answer to
//! `/callbacks/paynet/{refund_id}/{token}`. Hardened for that exposure:
//! POST only (anything else is 405), a body size limit
//! (`http.callback_max_body_bytes`), a per-request timeout
//! (`http.callback_timeout_ms`), and the same answer for an unknown refund
//! and a wrong token, so nobody can probe which refund ids exist. Every
//! refused callback is logged once and counted
//! (`refund_worker_callbacks_rejected_total{reason}`).

use super::{error, AppState};
use crate::worker::CallbackError;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tracing::warn;

/// The callback routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/callbacks/paynet/{id}/{token}", post(paynet_callback))
}

fn rejected(reason: &'static str, status: StatusCode, message: String) -> Response {
    warn!(reason, %message, "provider callback refused");
    crate::observability::metrics::callback_rejected(reason);
    error(status, message)
}

async fn paynet_callback(
    State(state): State<AppState>,
    Path((id, token)): Path<(String, String)>,
    body: Body,
) -> Response {
    let handled = async {
        let body = match axum::body::to_bytes(body, state.callback_max_body).await {
            Ok(body) => body,
            Err(_) => {
                return rejected(
                    "too_large",
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "callback body over {} bytes (or unreadable)",
                        state.callback_max_body
                    ),
                )
            }
        };
        match state.worker.paynet_callback(&id, &token, &body).await {
            Ok(outcome) => {
                Json(serde_json::json!({ "ok": true, "outcome": format!("{outcome:?}") }))
                    .into_response()
            }
            // Unknown refund and wrong token: one answer, no probing.
            Err(e @ CallbackError::NotFound) => {
                rejected("not_found", StatusCode::NOT_FOUND, e.to_string())
            }
            Err(e @ CallbackError::Invalid(_)) => {
                rejected("invalid", StatusCode::BAD_REQUEST, e.to_string())
            }
            // Non-2xx makes the provider try again; the record is already final.
            Err(e @ CallbackError::Publish(_)) => {
                error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Err(e @ CallbackError::Store(_)) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    };
    match tokio::time::timeout(state.callback_timeout, handled).await {
        Ok(response) => response,
        Err(_) => rejected(
            "timeout",
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "callback not handled within {} ms; try again",
                state.callback_timeout.as_millis()
            ),
        ),
    }
}
