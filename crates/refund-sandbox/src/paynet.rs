//! Paynet's `/v1/transaction/reversed_request` as the sandbox serves it:
//! `Authorization: Basic <secret_key>`, JSON `{xact_id, amount, succeedUrl}`,
//! `{"object_name":"transaction_reversed_request","message":"Başarılı
//! İşlem","code":0}` on acceptance, then the final answer posted to
//! `succeedUrl` after the configured delay. Errors are non-200 with
//! `{type, message, code, result_code}` (provider notes): 401
//! authorization_error/7, 404 no_data_error/12 for an unknown `xact_id`,
//! 400 invalid_request_error/11 for a partial refund of a same-day
//! transaction or a bad body, 400 api_error/1 for more than what is left.

use super::{Execution, FaultKind, Sandbox, SandboxState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// One original Paynet transaction in the seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaynetOriginal {
    /// Paynet transaction number.
    pub xact_id: String,
    /// Charged amount (kuruş).
    pub amount_minor: u64,
    /// Made today: only a full refund (a cancellation) is possible.
    #[serde(default)]
    pub same_day: bool,
    /// The final answer will be "1" (disapproved).
    #[serde(default)]
    pub disapprove: bool,
}

/// State of one Paynet original.
#[derive(Debug, Clone, Serialize)]
pub struct PaynetState {
    /// As seeded.
    #[serde(flatten)]
    pub seed: PaynetOriginal,
    /// Refunded so far (approved).
    pub refunded_minor: u64,
}

fn failure(status: StatusCode, kind: &str, result_code: u32, message: &str) -> Response {
    (
        status,
        Json(json!({ "type": kind, "message": message, "code": format!("E{result_code}"), "result_code": result_code })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Body {
    xact_id: String,
    #[serde(default)]
    amount: Option<String>,
    #[serde(rename = "succeedUrl", default)]
    succeed_url: Option<String>,
}

enum Decision {
    Reply(Response),
    Accepted {
        callback: Option<(String, serde_json::Value)>,
        fault: Option<FaultKind>,
        stall: Duration,
    },
}

/// Handles one reversed_request.
pub(super) async fn handle(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let decision = sandbox.answer(|state| decide(state, &headers, &body)).await;
    let (callback, fault, stall) = match decision {
        Decision::Reply(response) => return response,
        Decision::Accepted {
            callback,
            fault,
            stall,
        } => (callback, fault, stall),
    };
    if let Some((url, payload)) = callback {
        let delay = sandbox.lock().config.paynet_callback_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = reqwest::Client::new().post(url).json(&payload).send().await;
        });
    }
    match fault {
        Some(FaultKind::HtmlAfter) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "<html><body>error</body></html>",
        )
            .into_response(),
        Some(FaultKind::StallAfter) => {
            tokio::time::sleep(stall).await;
            accepted()
        }
        _ => accepted(),
    }
}

fn accepted() -> Response {
    Json(json!({ "object_name": "transaction_reversed_request", "message": "Başarılı İşlem", "code": 0 })).into_response()
}

fn decide(state: &mut SandboxState, headers: &HeaderMap, body: &[u8]) -> Decision {
    let expected = format!("Basic {}", state.config.paynet_secret);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Decision::Reply(failure(
            StatusCode::UNAUTHORIZED,
            "authorization_error",
            7,
            "Unauthorized",
        ));
    }
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        return Decision::Reply(failure(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            11,
            "Bad request",
        ));
    };
    let fault = state.take_fault(&body.xact_id);
    match fault.as_ref().map(|f| &f.fault) {
        Some(FaultKind::Unavailable) => {
            return Decision::Reply(StatusCode::SERVICE_UNAVAILABLE.into_response())
        }
        Some(FaultKind::HtmlBefore) => {
            return Decision::Reply(
                (
                    StatusCode::BAD_GATEWAY,
                    "<html><body>Bad gateway</body></html>",
                )
                    .into_response(),
            )
        }
        _ => {}
    }
    let Some(original) = state.paynet_originals.get(&body.xact_id).cloned() else {
        return Decision::Reply(failure(
            StatusCode::NOT_FOUND,
            "no_data_error",
            12,
            "No data",
        ));
    };
    let left = original.seed.amount_minor - original.refunded_minor;
    let amount = match body.amount.as_deref().map(str::trim) {
        None | Some("") | Some("0") => left,
        Some(text) => match text.parse::<u64>() {
            Ok(a) => a,
            Err(_) => {
                return Decision::Reply(failure(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    11,
                    "Bad amount",
                ))
            }
        },
    };
    if original.seed.same_day && amount != original.seed.amount_minor {
        return Decision::Reply(failure(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            11,
            "Partial refund is not possible for same-day transactions",
        ));
    }
    if amount == 0 || amount > left {
        return Decision::Reply(failure(
            StatusCode::BAD_REQUEST,
            "api_error",
            1,
            "Unsuccessful: amount exceeds what is left",
        ));
    }
    let refund_xact = format!("rx_{}", state.new_id());
    let approved = !original.seed.disapprove;
    if approved {
        if let Some(o) = state.paynet_originals.get_mut(&body.xact_id) {
            o.refunded_minor += amount;
        }
        state.journal.push(Execution {
            provider: "paynet".into(),
            action: "reversed_request".into(),
            original_id: body.xact_id.clone(),
            amount_minor: amount,
            new_id: refund_xact.clone(),
        });
    }
    let callback = body.succeed_url.map(|url| {
        let payload = json!({
            "xact_id": refund_xact,
            "code": if approved { "0" } else { "1" },
            "status": if approved { "approved" } else { "disapproved" },
            "message": if approved { "Refund approved" } else { "Refund disapproved by the bank" },
        });
        (url, payload)
    });
    let stall = fault
        .as_ref()
        .map(|f| Duration::from_millis(f.stall_ms))
        .unwrap_or_default();
    Decision::Accepted {
        callback,
        fault: fault.map(|f| f.fault),
        stall,
    }
}

/// Originals by `xact_id`.
pub(super) fn index(seed: &[PaynetOriginal]) -> HashMap<String, PaynetState> {
    seed.iter()
        .map(|o| {
            (
                o.xact_id.clone(),
                PaynetState {
                    seed: o.clone(),
                    refunded_minor: 0,
                },
            )
        })
        .collect()
}
