//! The operator console: a few server-rendered HTML pages on the private
//! listener, behind the operator token (entered once on `/console/login`,
//! kept in an HttpOnly, SameSite=Strict cookie; a Bearer header works too).
//! Plain forms, no JavaScript. One page shows what needs a person:
//!
//! * refunds in doubt, each with the two resolutions (executed with the
//!   provider's transaction id, or not executed), who and why;
//! * dead letters, with replay and edit (`path=value`, who and why);
//! * pending refunds past their account's alert age;
//! * each account's circuit breaker;
//! * today's reconciliation report.
//!
//! Every action goes through the same code as the CLI and the API, so the
//! same checks apply (two operators racing: the second is told what
//! happened); the answer comes back as a message on the page.

use super::{error, AppState};
use crate::ops::dlq::{Dlq, Filter};
use crate::store::RefundState;
use crate::values::secret::constant_time_eq;
use crate::worker::{Decision, Resolution};
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

mod view;

const COOKIE: &str = "rw_operator";

/// The console's routes.
pub(super) fn routes(state: AppState) -> Router<AppState> {
    let guarded = Router::new()
        .route("/console", get(page))
        .route("/console/resolve/{id}", post(resolve))
        .route("/console/replay/{id}", post(replay))
        .route("/console/edit/{id}", post(edit))
        .route_layer(middleware::from_fn_with_state(state, require_operator));
    Router::new()
        .route("/console/login", get(login_page).post(login))
        .merge(guarded)
}

fn token_of(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_string());
    }
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())?
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

async fn require_operator(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.operator_token else {
        crate::observability::metrics::operator_refused("off");
        return error(
            StatusCode::FORBIDDEN,
            "the operator console is off: set http.operator_token",
        );
    };
    match token_of(&request) {
        Some(token) if constant_time_eq(token.as_bytes(), expected.expose().as_bytes()) => {
            next.run(request).await
        }
        _ => {
            tracing::warn!(path = %request.uri().path(), "console request refused: not signed in");
            crate::observability::metrics::operator_refused("unauthorized");
            Redirect::to("/console/login").into_response()
        }
    }
}

async fn login_page() -> Html<String> {
    render(&view::LoginPage {
        title: "refund-worker: sign in",
        refused: false,
    })
}

/// A rendered page; a template that fails to render (it cannot, for want
/// of data: askama checks them at compile time) is a plain error line.
fn render(page: &impl askama::Template) -> Html<String> {
    Html(
        page.render()
            .unwrap_or_else(|e| format!("console page: {e}")),
    )
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(state): State<AppState>, Form(login): Form<Login>) -> Response {
    let ok = state
        .operator_token
        .as_ref()
        .is_some_and(|t| constant_time_eq(login.token.trim().as_bytes(), t.expose().as_bytes()));
    if !ok {
        tracing::warn!("console sign-in refused");
        crate::observability::metrics::operator_refused("unauthorized");
        return (
            StatusCode::UNAUTHORIZED,
            render(&view::LoginPage {
                title: "refund-worker: sign in",
                refused: true,
            }),
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/console",
        login.token.trim()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/console")).into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    msg: Option<String>,
    err: Option<String>,
}

async fn page(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Html<String> {
    render(&view::ConsolePage::gather(&state.worker, q.msg, q.err).await)
}

fn back(result: Result<String, String>) -> Response {
    let (key, text) = match result {
        Ok(msg) => ("msg", msg),
        Err(err) => ("err", err),
    };
    let encoded = serde_urlencoded::to_string([(key, text)]).unwrap_or_default();
    Redirect::to(&format!("/console?{encoded}")).into_response()
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("{field} is required"));
    }
    Ok(value)
}

#[derive(Deserialize)]
struct ResolveForm {
    verdict: String,
    #[serde(default)]
    executed: String,
    #[serde(default)]
    performed: String,
    #[serde(default)]
    by: String,
    #[serde(default)]
    reason: String,
}

async fn resolve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<ResolveForm>,
) -> Response {
    let result = async {
        let by = required("by", &f.by)?.to_string();
        let reason = required("reason", &f.reason)?.to_string();
        let resolution = match f.verdict.as_str() {
            "executed" => Resolution {
                executed: Some(
                    required("executed (the provider's transaction id)", &f.executed)?.to_string(),
                ),
                performed: match f.performed.as_str() {
                    "refund" => Some(crate::contract::command::Operation::Refund),
                    "cancel" => Some(crate::contract::command::Operation::Cancel),
                    _ => None,
                },
                not_executed: false,
                by,
                reason,
            },
            "not_executed" => Resolution {
                not_executed: true,
                by,
                reason,
                ..Default::default()
            },
            other => {
                return Err(format!(
                    "verdict {other:?} is neither executed nor not_executed"
                ))
            }
        };
        state
            .worker
            .resolve(&id, resolution)
            .await
            .map(|r| format!("{id} resolved: now {}", r.status()))
            .map_err(|e| e.to_string())
    }
    .await;
    back(result)
}

/// Runs a dead-letter action off the request's task: the dead-letter
/// tools take async callbacks whose futures are not `Send`, which an axum
/// handler needs; the action is built and run on the blocking pool.
async fn off_task<F, Fut>(make: F) -> Result<String, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

async fn replay(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    back(off_task(move || replay_work(state, id)).await)
}

async fn replay_work(state: AppState, id: String) -> Result<String, String> {
    {
        let mut dlq = Dlq::open(&state.worker.settings().amqp)
            .await
            .map_err(|e| e.to_string())?;
        let filter = Filter {
            refund_id: Some(id.clone()),
            ..Default::default()
        };
        let store = state.worker.store().clone();
        let max_age = state.worker.settings().store.retention().tombstones;
        let report = dlq
            .replay(
                &filter,
                None,
                false,
                max_age,
                async |rid: &str| {
                    // Unknown or in doubt: never replay on a guess.
                    match store.lookup(rid).await {
                        Ok(Some(crate::store::Known::Record(r))) => r.may_have_been_paid_unseen(),
                        Ok(Some(crate::store::Known::Tombstone(_))) => false,
                        _ => true,
                    }
                },
                |_| {},
            )
            .await;
        dlq.close().await;
        let report = report.map_err(|e| e.to_string())?;
        tracing::info!(
            refund_id = id.as_str(),
            replayed = report.done,
            "console: replay"
        );
        if !report.skipped_too_old.is_empty() {
            return Err(format!(
                "{id} first failed longer ago than store.tombstone_retention: its record may be \
                 gone, so a replay could pay it again; check with the provider instead"
            ));
        }
        match (report.done, report.skipped_in_doubt.is_empty()) {
            (0, false) => Err(format!(
                "{id} is in doubt (it may have been paid): resolve it first"
            )),
            (0, true) => Err(format!(
                "no dead letter for {id} (replayed or edited already?)"
            )),
            (n, _) => Ok(format!("{id}: {n} message(s) replayed")),
        }
    }
}

#[derive(Deserialize)]
struct EditForm {
    #[serde(default)]
    set: String,
    #[serde(default)]
    by: String,
    #[serde(default)]
    reason: String,
}

async fn edit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<EditForm>,
) -> Response {
    back(off_task(move || edit_work(state, id, f)).await)
}

async fn edit_work(state: AppState, id: String, f: EditForm) -> Result<String, String> {
    let set = required("set (path=value)", &f.set)?.to_string();
    let decision = Decision {
        by: required("by", &f.by)?.to_string(),
        reason: required("reason", &f.reason)?.to_string(),
    };
    let worker = state.worker.clone();
    let store = worker.store().clone();
    crate::ops::dlq_edit_with(
        &worker.settings().amqp,
        &id,
        &[set],
        &decision,
        false,
        async |rid: &str| {
            Ok(matches!(store.get(rid).await, Ok(Some(r)) if matches!(r.state, RefundState::InDoubt { .. })))
        },
        async |rid: &str, command: &serde_json::Value, decision: &Decision, changes: &str| {
            worker
                .amend(rid, command, decision.clone(), changes)
                .await
                .map(|_| ())
                .map_err(|e| crate::ops::OpsError::Refused(e.to_string()))
        },
        |diff: &str| tracing::info!(refund_id = id.as_str(), by = decision.by.as_str(), %diff, "console: dead letter edited"),
    )
    .await
    .map(|diff| format!("{id} corrected and replayed: {}", diff.trim()))
    .map_err(|e| e.to_string())
}
