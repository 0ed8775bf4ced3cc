//! The operator API over the store (the running worker holds the store's
//! lock, so operator tools go through it). Every request needs
//! `Authorization: Bearer <http.operator_token>`, compared in constant time;
//! without a configured token the API is off (403), never open. A refused
//! request is logged once, without the token.
//!
//! * `GET /refunds/{id}`: the record with its history (or its tombstone).
//! * `GET /refunds?status=in_doubt&limit=100`: records by status.
//! * `POST /refunds/{id}/resolve`: settle an in-doubt refund
//!   (`{"executed": "<txn>", "performed": "refund"}` or
//!   `{"not_executed": true}`, with `by` and `reason`).
//! * `POST /refunds/{id}/abandon`: give up a refund that will not be sent
//!   (`failed`, `error.kind = abandoned`; `by`, `reason`, and `command`: the
//!   body of its message, for a refund the store does not know); a decided
//!   refund's event is published again (see `worker/abandon.rs`).
//! * `POST /refunds/{id}/release`: release an over-refund reservation that
//!   nothing will settle (`by`, `reason`).
//! * `GET /report?from=YYYY-MM-DD&to=YYYY-MM-DD`: the reconciliation report
//!   (see `report.rs`).

use super::{error, AppState};
use crate::store::{Known, Tombstone};
use crate::values::secret::constant_time_eq;
use crate::worker::{Abandoned, Carrier, Decision, Resolution, ResolveError};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::warn;

/// The `/refunds` routes, behind the token check.
pub(super) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/refunds", get(list_refunds))
        .route("/refunds/{id}", get(show_refund))
        .route("/refunds/{id}/resolve", post(resolve_refund))
        .route("/refunds/{id}/abandon", post(abandon_refund))
        .route("/refunds/{id}/release", post(release_refund))
        .route("/refunds/{id}/amend", post(amend_refund))
        .route("/report", get(report))
        .route_layer(middleware::from_fn_with_state(state, require_token))
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let Some(expected) = &state.operator_token else {
        warn!(%path, "operator request refused: the operator API is off (no http.operator_token)");
        crate::observability::metrics::operator_refused("off");
        return error(
            StatusCode::FORBIDDEN,
            "the operator API is off: set http.operator_token",
        );
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.expose().as_bytes()) => {
            next.run(request).await
        }
        _ => {
            warn!(%path, "operator request refused: missing or wrong bearer token");
            crate::observability::metrics::operator_refused("unauthorized");
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <http.operator_token>)",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// A record as the API shows it: a payout's card token masked.
fn shown(mut record: crate::store::RefundRecord) -> crate::store::RefundRecord {
    record.command = record.command.masked();
    record
}

async fn show_refund(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.worker.store().lookup(&id).await {
        Ok(Some(Known::Record(record))) => Json(shown(*record)).into_response(),
        Ok(Some(Known::Tombstone(t))) => Json(tombstone_view(&id, &t)).into_response(),
        Ok(None) => no_such_refund(&id),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A pruned refund: what is left of it, in the record's shape.
fn tombstone_view(id: &str, t: &Tombstone) -> serde_json::Value {
    serde_json::json!({
        "refund_id": id,
        "payload_hash": t.payload_hash,
        "state": { "state": "tombstone", "status": t.status, "event_id": t.event_id,
                   "performed": t.performed, "provider_transaction_id": t.provider_transaction_id },
        "attempts": t.attempts,
        "updated_at": t.pruned_at,
    })
}

/// 404 for a refund the store does not know, told apart (by
/// `"not_found": "refund"`) from a 404 for a path this listener does not
/// serve: a client must never read a wrong address as "no record".
fn no_such_refund(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": format!("no refund {id}"), "not_found": "refund" })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_refunds(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000);
    match state.worker.store().list(q.status, limit).await {
        Ok(records) => Json(records.into_iter().map(shown).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn decision_error(e: ResolveError) -> Response {
    let status = match &e {
        ResolveError::NotFound(id) => return no_such_refund(id),
        ResolveError::WrongState { .. } => StatusCode::CONFLICT,
        ResolveError::Invalid(_) => StatusCode::BAD_REQUEST,
        ResolveError::Publish(_) => StatusCode::BAD_GATEWAY,
        ResolveError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

#[derive(Deserialize)]
struct Abandonment {
    by: String,
    reason: String,
    /// The body of the refund's message (a purge).
    #[serde(default)]
    command: Option<serde_json::Value>,
    /// That message was not read as a command (too large, the wrong
    /// content type).
    #[serde(default)]
    unread: bool,
}

async fn abandon_refund(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(a): Json<Abandonment>,
) -> Response {
    let decision = Decision {
        by: a.by,
        reason: a.reason,
    };
    let carrier = a.command.map(|body| Carrier {
        body,
        unread: a.unread,
    });
    match state.worker.abandon(&id, decision, carrier).await {
        Ok(Abandoned::Recorded(record)) => Json(shown(*record)).into_response(),
        Ok(Abandoned::Decided(t)) => Json(tombstone_view(&id, &t)).into_response(),
        Ok(Abandoned::Rejected(reason)) => Json(serde_json::json!({
            "refund_id": id,
            "state": { "state": "rejected", "reason": reason },
        }))
        .into_response(),
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
        Ok(record) => Json(shown(record)).into_response(),
        Err(e) => decision_error(e),
    }
}

#[derive(Deserialize)]
struct ReportQuery {
    from: String,
    to: String,
}

/// `GET /report?from=YYYY-MM-DD&to=YYYY-MM-DD`: the reconciliation report.
async fn report(State(state): State<AppState>, Query(q): Query<ReportQuery>) -> Response {
    let (from, to) = match (
        crate::contract::report::parse_day(&q.from),
        crate::contract::report::parse_day(&q.to),
    ) {
        (Ok(from), Ok(to)) if from <= to => (from, to),
        (Ok(_), Ok(_)) => return error(StatusCode::BAD_REQUEST, "from is after to"),
        (Err(e), _) => return error(StatusCode::BAD_REQUEST, format!("from: {e}")),
        (_, Err(e)) => return error(StatusCode::BAD_REQUEST, format!("to: {e}")),
    };
    match state.worker.store().report(from, to).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct Amendment {
    command: serde_json::Value,
    by: String,
    reason: String,
    #[serde(default)]
    changes: String,
}

/// `POST /refunds/{id}/amend`: the corrected command of a refund with
/// nothing sent (`dlq edit`).
async fn amend_refund(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(a): Json<Amendment>,
) -> Response {
    let decision = Decision {
        by: a.by,
        reason: a.reason,
    };
    match state
        .worker
        .amend(&id, &a.command, decision, &a.changes)
        .await
    {
        Ok(recorded) => {
            Json(serde_json::json!({ "refund_id": id, "record_amended": recorded })).into_response()
        }
        Err(e) => decision_error(e),
    }
}
