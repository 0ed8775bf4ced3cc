//! The provider's answer → one [`ProviderOutcome`].

use crate::providers::ProviderOutcome;
use serde_json::Value;

fn code_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Turns an answer (HTTP status and body) into an outcome.
pub fn classify(status: u16, body: &str) -> ProviderOutcome {
    let json: Option<Value> = serde_json::from_str(body.trim()).ok();
    if status == 200 {
        let Some(json) = json else {
            return ProviderOutcome::Unknown {
                reason: "unparsable Paynet answer".into(),
            };
        };
        let message = json["message"].as_str().unwrap_or_default().to_string();
        return match code_text(&json["code"]).as_deref() {
            Some("0") => ProviderOutcome::Accepted {
                code: "0".into(),
                message,
            },
            Some(other) => by_result_code(other, "", message),
            None => ProviderOutcome::Unknown {
                reason: "Paynet answer without code".into(),
            },
        };
    }
    let Some(json) = json.filter(|j| j.get("result_code").is_some() || j.get("type").is_some())
    else {
        return crate::providers::classify_http_status(
            reqwest::StatusCode::from_u16(status)
                .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR),
            None,
        );
    };
    if status == 503 || status == 429 {
        return ProviderOutcome::NotSent {
            reason: format!("Paynet answered HTTP {status}"),
            retry_after: None,
        };
    }
    let message = json["message"].as_str().unwrap_or_default().to_string();
    let kind = json["type"].as_str().unwrap_or_default().to_string();
    let code = code_text(&json["result_code"])
        .or_else(|| code_text(&json["code"]))
        .unwrap_or_default();
    by_result_code(&code, &kind, message)
}

/// Paynet's result codes (provider notes): 1 unsuccessful, 2–4 company or
/// agent blocked or not found, 5 duplicate data, 7 unauthorized, 8 server
/// error, 10 timeout, 11 bad request, 12 no data, 100 old successful.
fn by_result_code(code: &str, kind: &str, message: String) -> ProviderOutcome {
    if kind == "authorization_error" {
        return ProviderOutcome::Misconfigured {
            code: code.to_string(),
            message,
        };
    }
    match code {
        "1" | "11" | "12" => ProviderOutcome::Declined {
            code: code.to_string(),
            message,
        },
        "2" | "3" | "4" | "7" => ProviderOutcome::Misconfigured {
            code: code.to_string(),
            message,
        },
        // 8 server error, 10 timeout: may have been executed. 5 "duplicate
        // data": Paynet has no idempotency key, so it means an identical
        // earlier request exists, which may have been executed. 100 "old
        // successful" suggests an earlier execution. A person checks.
        _ => ProviderOutcome::Unknown {
            reason: format!("Paynet result_code {code} ({kind}): {message}"),
        },
    }
}

/// The callback posted to `succeedUrl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    /// Paynet's number of the refund transaction.
    pub xact_id: String,
    /// `true` for code "0" (approved), `false` for "1" (disapproved).
    pub approved: bool,
    /// The raw code.
    pub code: String,
    /// Status text.
    pub status: String,
    /// Message.
    pub message: String,
}

/// Parses a callback body.
pub fn parse_callback(body: &[u8]) -> Result<Callback, String> {
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("callback is not JSON: {e}"))?;
    let code = code_text(&json["code"]).ok_or("callback without code")?;
    let approved = match code.as_str() {
        "0" => true,
        "1" => false,
        other => {
            return Err(format!(
                "callback code {other:?} is neither \"0\" nor \"1\""
            ))
        }
    };
    Ok(Callback {
        xact_id: json["xact_id"].as_str().unwrap_or_default().to_string(),
        approved,
        code,
        status: json["status"].as_str().unwrap_or_default().to_string(),
        message: json["message"].as_str().unwrap_or_default().to_string(),
    })
}
