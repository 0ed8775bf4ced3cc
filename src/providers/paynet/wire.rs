//! Paynet's wire format, pure: the `reversed_request` JSON body, the
//! classification of its answers, and the `succeedUrl` callback.
//!
//! From `provider-docs/paynet-refund.md`: `xact_id` required; `amount` a
//! string of minor units ("1000" is 10.00 TL), absent or "0" refunds
//! everything; `code: 0` in the answer; the final answer is POSTed to
//! `succeedUrl` as `{xact_id, code: "0" approved | "1" disapproved, status,
//! message}`. From `provider-notes.md`: `code: 0` means accepted, not paid;
//! error answers are non-200 with `{type, message, code, result_code}`.

use crate::command::{Operation, RefundCommand};
use crate::money;
use crate::providers::ProviderOutcome;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversedRequest {
    /// The original transaction.
    pub xact_id: String,
    /// Minor units as a string; absent for a full refund. Never "0": that
    /// would refund everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// Where Paynet posts the final answer.
    #[serde(
        rename = "succeedUrl",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub succeed_url: Option<String>,
}

/// Translates a command, or says which field is wrong.
pub fn request_for(command: &RefundCommand, succeed_url: &str) -> Result<ReversedRequest, String> {
    if let Some(extra) = command.transaction.keys().find(|k| k.as_str() != "xact_id") {
        return Err(format!(
            "transaction.{extra} is not used by paynet (only transaction.xact_id)"
        ));
    }
    let xact_id = command
        .transaction_str("xact_id")
        .ok_or("transaction.xact_id (the Paynet transaction number) is required")?;
    if command.installments.is_some() {
        return Err("installments are not supported by paynet".into());
    }
    let amount = match (command.operation, &command.amount) {
        (Operation::Cancel, _) | (Operation::Refund, None) => None,
        (Operation::Refund, Some(amount)) => {
            if money::minor_digits(&amount.currency) != 2 {
                return Err(format!(
                    "amount.currency {}: Paynet amounts are in hundredths",
                    amount.currency
                ));
            }
            // minor > 0 is guaranteed by command validation: a partial refund
            // can never be sent as "0" (which would refund everything).
            Some(amount.minor.to_string())
        }
    };
    Ok(ReversedRequest {
        xact_id: xact_id.to_string(),
        amount,
        succeed_url: Some(succeed_url.to_string()),
    })
}

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
        return super::super::classify_http_status(
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
        "1" | "5" | "11" | "12" => ProviderOutcome::Declined {
            code: code.to_string(),
            message,
        },
        "2" | "3" | "4" | "7" => ProviderOutcome::Misconfigured {
            code: code.to_string(),
            message,
        },
        // 8 server error, 10 timeout: may have been executed. 100 "old
        // successful" suggests an earlier execution: a person checks.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn command(json: &str) -> RefundCommand {
        RefundCommand::parse(json.as_bytes()).expect("command")
    }

    #[test]
    fn builds_the_documented_request() {
        let xact = "xk_EAAAAAh7VYf9HG4+GR9ezqiMWAA8PY6P4eroE4BUUHRCLxGO";
        let full = command(&format!(
            r#"{{"refund_id":"r","provider":"p","transaction":{{"xact_id":"{xact}"}}}}"#
        ));
        let body = serde_json::to_value(request_for(&full, "https://w/cb/r/t").expect("req"))
            .expect("json");
        assert_eq!(
            body,
            serde_json::json!({"xact_id": xact, "succeedUrl": "https://w/cb/r/t"})
        );
        // "10.00 TL" => "1000"
        let partial = command(&format!(
            r#"{{"refund_id":"r","provider":"p","transaction":{{"xact_id":"{xact}"}},"amount":{{"minor":1000,"currency":"TRY"}}}}"#
        ));
        assert_eq!(
            request_for(&partial, "u").expect("req").amount.as_deref(),
            Some("1000")
        );
        let cancel = command(&format!(
            r#"{{"refund_id":"r","provider":"p","operation":"cancel","transaction":{{"xact_id":"{xact}"}}}}"#
        ));
        assert_eq!(request_for(&cancel, "u").expect("req").amount, None);
    }

    #[test]
    fn refuses_what_paynet_cannot_take() {
        for (json, needle) in [
            (
                r#"{"refund_id":"r","provider":"p","transaction":{"id":"1"}}"#,
                "only transaction.xact_id",
            ),
            (
                r#"{"refund_id":"r","provider":"p","transaction":{"xact_id":""}}"#,
                "required",
            ),
            (
                r#"{"refund_id":"r","provider":"p","transaction":{"xact_id":"x"},"amount":{"minor":5,"currency":"JPY"}}"#,
                "hundredths",
            ),
        ] {
            let err = request_for(&command(json), "u").expect_err(json);
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn classifies_the_documented_answers() {
        let ok =
            r#"{"object_name":"transaction_reversed_request","message":"Başarılı İşlem","code":0}"#;
        assert_eq!(
            classify(200, ok),
            ProviderOutcome::Accepted {
                code: "0".into(),
                message: "Başarılı İşlem".into()
            }
        );
        let error = |t: &str, rc: u32| {
            format!(r#"{{"type":"{t}","message":"m","code":"x","result_code":{rc}}}"#)
        };
        assert!(matches!(
            classify(400, &error("invalid_request_error", 11)),
            ProviderOutcome::Declined { .. }
        ));
        assert!(matches!(
            classify(404, &error("no_data_error", 12)),
            ProviderOutcome::Declined { .. }
        ));
        assert!(matches!(
            classify(400, &error("api_error", 1)),
            ProviderOutcome::Declined { .. }
        ));
        assert!(matches!(
            classify(401, &error("authorization_error", 7)),
            ProviderOutcome::Misconfigured { .. }
        ));
        assert!(matches!(
            classify(403, &error("api_error", 3)),
            ProviderOutcome::Misconfigured { .. }
        ));
        assert!(matches!(
            classify(500, &error("api_error", 8)),
            ProviderOutcome::Unknown { .. }
        ));
        assert!(matches!(
            classify(504, &error("api_error", 10)),
            ProviderOutcome::Unknown { .. }
        ));
        assert!(matches!(
            classify(400, &error("api_error", 100)),
            ProviderOutcome::Unknown { .. }
        ));
        assert!(matches!(
            classify(503, "busy"),
            ProviderOutcome::NotSent { .. }
        ));
        assert!(matches!(
            classify(502, "<html>"),
            ProviderOutcome::Unknown { .. }
        ));
        assert!(matches!(
            classify(200, "<html>"),
            ProviderOutcome::Unknown { .. }
        ));
    }

    #[test]
    fn parses_callbacks() {
        let cb =
            parse_callback(br#"{"xact_id":"abc","code":"0","status":"approved","message":"ok"}"#)
                .expect("cb");
        assert!(cb.approved);
        assert_eq!(cb.xact_id, "abc");
        assert!(
            !parse_callback(br#"{"xact_id":"abc","code":1,"status":"no","message":"x"}"#)
                .expect("cb")
                .approved
        );
        assert!(parse_callback(br#"{"xact_id":"abc","code":"7"}"#).is_err());
        assert!(parse_callback(b"nope").is_err());
    }
}
