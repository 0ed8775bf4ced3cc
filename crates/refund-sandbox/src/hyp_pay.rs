//! Hyp Pay's `/p/` as the sandbox serves it: `zikoyAPI` and `CancelTrans`,
//! GET query or POST form, answers URL-encoded with `text/html` as the real
//! service does.
//!
//! Documented answers: success `Id=…&CCode=0&ACode=…` (refund) and
//! `TransId=…&CCode=0&Hesh=…&ReversalStatus=777` (cancel); `33` refund over
//! the original amount; `902` wrong `PassP`; `920` cancel impossible (unknown
//! or transmitted). Not documented, chosen here from the provider notes:
//! `901` for a terminal number that is not ours, `400` for missing or
//! malformed fields and for an unknown `TransId` on refunds.

use super::{Execution, FaultKind, Sandbox, SandboxState};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use refund_worker::contract::money;
use std::time::Duration;

const HTML_ERROR: &str = "<html><head><title>Error</title></head><body><h1>System error</h1>\
<p>An unexpected error occurred. Please try again later.</p></body></html>";

pub(super) enum Answer {
    Text(String),
    Html(StatusCode),
    StallThen(Duration, String),
}

/// Handles one `/p/` request.
pub(super) async fn handle(
    State(sandbox): State<Sandbox>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let mut params: Vec<(String, String)> = query
        .as_deref()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    if let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) {
        params.extend(form);
    }
    let answer = sandbox.answer(|state| decide(state, &params)).await;
    match answer {
        Answer::Text(text) => text_response(text),
        Answer::Html(status) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            HTML_ERROR,
        )
            .into_response(),
        Answer::StallThen(stall, text) => {
            tokio::time::sleep(stall).await;
            text_response(text)
        }
    }
}

fn text_response(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        text,
    )
        .into_response()
}

fn decide(state: &mut SandboxState, params: &[(String, String)]) -> Answer {
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let action = get("action").unwrap_or_default().to_ascii_lowercase();
    if get("Masof").as_deref() != Some(state.config.hyp_masof.as_str()) {
        return Answer::Text("CCode=901".into());
    }
    if get("PassP").as_deref() != Some(state.config.hyp_pass_p.as_str()) {
        return Answer::Text("CCode=902".into());
    }
    if action == "soft" {
        return super::hyp_pay_payout::decide(state, &get);
    }
    let Some(trans_id) = get("TransId").filter(|t| !t.is_empty()) else {
        return Answer::Text("CCode=400".into());
    };
    let fault = state.take_fault(&trans_id);
    match fault.as_ref().map(|f| &f.fault) {
        Some(FaultKind::Unavailable) => return Answer::Html(StatusCode::SERVICE_UNAVAILABLE),
        Some(FaultKind::HtmlBefore) => return Answer::Html(StatusCode::OK),
        Some(FaultKind::AnswerCode(code)) => return Answer::Text(format!("CCode={code}")),
        _ => {}
    }
    let (executed, text) = match action.as_str() {
        "zikoyapi" => refund(state, &trans_id, get("Amount").as_deref()),
        "canceltrans" => cancel(state, &trans_id),
        _ => (false, "CCode=400".to_string()),
    };
    match fault {
        Some(f) if executed && f.fault == FaultKind::HtmlAfter => Answer::Html(StatusCode::OK),
        Some(f) if executed && f.fault == FaultKind::StallAfter => {
            Answer::StallThen(Duration::from_millis(f.stall_ms), text)
        }
        _ => Answer::Text(text),
    }
}

fn refund(state: &mut SandboxState, trans_id: &str, amount: Option<&str>) -> (bool, String) {
    let Some(amount) = amount
        .and_then(|a| money::parse_decimal(a, 2))
        .filter(|a| *a > 0)
    else {
        return (false, "CCode=400".into());
    };
    let Some(original) = state.originals.get(trans_id) else {
        return (false, "CCode=400".into());
    };
    let left = if original.cancelled {
        0
    } else {
        original.seed.amount_minor - original.refunded_minor
    };
    if amount > left {
        return (false, "CCode=33".into());
    }
    let new_id = state.new_id();
    if let Some(original) = state.originals.get_mut(trans_id) {
        original.refunded_minor += amount;
    }
    state.journal.push(Execution {
        provider: "hyp_pay".into(),
        action: "zikoyAPI".into(),
        original_id: trans_id.to_string(),
        amount_minor: amount,
        new_id: new_id.clone(),
    });
    let acode = format!("{:07}", state.next_id % 10_000_000);
    (
        true,
        format!("Id={new_id}&CCode=0&ACode={acode}&HeshASM=EZ"),
    )
}

fn cancel(state: &mut SandboxState, trans_id: &str) -> (bool, String) {
    let cancellable = state
        .originals
        .get(trans_id)
        .is_some_and(|o| !o.seed.transmitted && !o.cancelled && o.refunded_minor == 0);
    if !cancellable {
        return (false, format!("TransId={trans_id}&CCode=920"));
    }
    let mut amount = 0;
    if let Some(original) = state.originals.get_mut(trans_id) {
        original.cancelled = true;
        amount = original.seed.amount_minor;
        original.refunded_minor = amount;
    }
    state.journal.push(Execution {
        provider: "hyp_pay".into(),
        action: "CancelTrans".into(),
        original_id: trans_id.to_string(),
        amount_minor: amount,
        new_id: trans_id.to_string(),
    });
    (
        true,
        format!("TransId={trans_id}&CCode=0&Hesh=EZ&ReversalStatus=777"),
    )
}
