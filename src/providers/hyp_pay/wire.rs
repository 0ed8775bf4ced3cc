//! Hyp Pay's wire format, pure: building the form of a `zikoyAPI` or
//! `CancelTrans` request and classifying the URL-encoded answer.
//!
//! From the provider's pages (`provider-docs/hyp-pay-*.md`): answers are HTTP
//! 200 for almost everything; success is `CCode=0` and nothing else; an HTML
//! answer is a system error. From `provider-notes.md`: 999/009/599 are
//! communication errors with an unknown outcome; 901/902/903/996/997 are
//! configuration or credential errors.

use crate::command::{Operation, RefundCommand};
use crate::config::HypPayAccount;
use crate::money;
use crate::providers::ProviderOutcome;

/// Refund action.
pub const ACTION_REFUND: &str = "zikoyAPI";
/// Cancel action.
pub const ACTION_CANCEL: &str = "CancelTrans";

/// A request ready to be sent as a form. `pass_p` stays a secret until
/// [`HypRequest::fields`] builds the body.
#[derive(Debug, Clone)]
pub struct HypRequest<'a> {
    /// `zikoyAPI` or `CancelTrans`.
    pub action: &'static str,
    /// The account.
    pub account: &'a HypPayAccount,
    /// Original transaction id.
    pub trans_id: String,
    /// Decimal amount in major units (refunds only).
    pub amount: Option<String>,
}

impl HypRequest<'_> {
    /// The form fields, in the documented order, with UTF-8 in and out.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = vec![
            ("action", self.action),
            ("Masof", self.account.masof.as_str()),
            ("PassP", self.account.pass_p.expose()),
            ("TransId", self.trans_id.as_str()),
        ];
        if let Some(amount) = &self.amount {
            fields.push(("Amount", amount.as_str()));
        }
        fields.push(("UTF8", "True"));
        fields.push(("UTF8out", "True"));
        fields
    }
}

/// Translates a command into a request, or says which field is wrong.
pub fn request_for<'a>(
    command: &RefundCommand,
    account: &'a HypPayAccount,
) -> Result<HypRequest<'a>, String> {
    let trans_id = command
        .transaction_str("id")
        .ok_or("transaction.id (the Hyp Pay TransId of the original charge) is required")?;
    if !trans_id.bytes().all(|b| b.is_ascii_alphanumeric()) || trans_id.len() > 32 {
        return Err(format!(
            "transaction.id {trans_id:?} is not a Hyp Pay transaction id"
        ));
    }
    if let Some(extra) = command.transaction.keys().find(|k| k.as_str() != "id") {
        return Err(format!(
            "transaction.{extra} is not used by hyp_pay (only transaction.id)"
        ));
    }
    if command.installments.is_some() {
        return Err("installments are not supported by hyp_pay".into());
    }
    let (action, amount) = match command.operation {
        Operation::Refund => {
            let amount = command
                .amount
                .as_ref()
                .ok_or("amount is required for a hyp_pay refund")?;
            let digits = money::minor_digits(&amount.currency);
            if digits > 2 {
                return Err(format!(
                    "amount.currency {} has {digits} decimals; Hyp Pay amounts take at most 2",
                    amount.currency
                ));
            }
            (
                ACTION_REFUND,
                Some(money::format_decimal(amount.minor, digits)),
            )
        }
        Operation::Cancel => (ACTION_CANCEL, None),
    };
    Ok(HypRequest {
        action,
        account,
        trans_id: trans_id.to_string(),
        amount,
    })
}

/// The fields of a URL-encoded answer, in order.
pub fn parse_fields(body: &str) -> Option<Vec<(String, String)>> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(body.trim()).ok()
}

/// What a code means, from the documentation and notes.
pub fn describe(code: u32) -> &'static str {
    match code {
        0 => "Success",
        9 | 599 | 999 => "Communication error",
        1..=26 => "Declined by the card issuer",
        33 => "Amount exceeds the original transaction value",
        400..=402 => "Missing or inconsistent data",
        901 => "No permission for this terminal",
        902 => "Authentication failure: wrong PassP",
        903 | 996 | 997 => "Terminal configuration error",
        920 => "Transaction cannot be cancelled (doesn't exist or was already transmitted)",
        _ => "Declined by Hyp",
    }
}

/// Turns a 200 answer's body into an outcome.
pub fn classify(operation: Operation, body: &str) -> ProviderOutcome {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return ProviderOutcome::Unknown {
            reason: "empty answer from Hyp Pay".into(),
        };
    }
    if trimmed.starts_with('<') || trimmed.to_ascii_lowercase().contains("<html") {
        return ProviderOutcome::Unknown {
            reason: "HTML answer from Hyp Pay (system error)".into(),
        };
    }
    let Some(fields) = parse_fields(trimmed) else {
        return ProviderOutcome::Unknown {
            reason: "answer is not URL-encoded".into(),
        };
    };
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let Some(raw_code) = get("CCode") else {
        return ProviderOutcome::Unknown {
            reason: "answer has no CCode".into(),
        };
    };
    let Ok(code) = raw_code.parse::<u32>() else {
        return ProviderOutcome::Unknown {
            reason: format!("CCode {raw_code:?} is not a number"),
        };
    };
    let message = describe(code).to_string();
    match code {
        0 => ProviderOutcome::Confirmed {
            provider_txn: match operation {
                Operation::Refund => get("Id"),
                Operation::Cancel => get("TransId"),
            },
            performed: operation,
            code: raw_code,
            message: Some(message),
        },
        9 | 599 | 999 => ProviderOutcome::Unknown {
            reason: format!("Hyp Pay CCode={raw_code}: {message}"),
        },
        901 | 902 | 903 | 996 | 997 => ProviderOutcome::Misconfigured {
            code: raw_code,
            message,
        },
        _ => ProviderOutcome::Declined {
            code: raw_code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn account() -> HypPayAccount {
        HypPayAccount {
            base_url: "https://pay.hyp.co.il/p/".into(),
            masof: "0010131918".into(),
            pass_p: Secret::new("your-api-password"),
        }
    }

    fn command(json: &str) -> RefundCommand {
        RefundCommand::parse(json.as_bytes()).expect("command")
    }

    #[test]
    fn builds_the_documented_refund_request() {
        // Docs: ?action=zikoyAPI&Masof=0010131918&PassP=your-api-password&TransId=12290620&Amount=10
        let account = account();
        let cmd = command(
            r#"{"refund_id":"r1","provider":"hyp_pay","transaction":{"id":"12290620"},"amount":{"minor":1000,"currency":"ILS"}}"#,
        );
        let req = request_for(&cmd, &account).expect("request");
        let body = serde_urlencoded::to_string(req.fields()).expect("form");
        assert_eq!(
            body,
            "action=zikoyAPI&Masof=0010131918&PassP=your-api-password&TransId=12290620&Amount=10.00&UTF8=True&UTF8out=True"
        );
        assert!(!format!("{req:?}").contains("your-api-password"));
    }

    #[test]
    fn formats_partial_amounts_with_two_decimals() {
        let account = account();
        let cmd = command(
            r#"{"refund_id":"r1","provider":"hyp_pay","transaction":{"id":"1"},"amount":{"minor":1050,"currency":"ILS"}}"#,
        );
        assert_eq!(
            request_for(&cmd, &account).expect("req").amount.as_deref(),
            Some("10.50")
        );
    }

    #[test]
    fn builds_the_documented_cancel_request() {
        // Docs: ?action=CancelTrans&Masof=0010131918&PassP=your-api-password&TransId=405532558
        let account = account();
        let cmd = command(
            r#"{"refund_id":"r1","provider":"hyp_pay","operation":"cancel","transaction":{"id":"405532558"}}"#,
        );
        let req = request_for(&cmd, &account).expect("request");
        let body = serde_urlencoded::to_string(req.fields()).expect("form");
        assert_eq!(
            body,
            "action=CancelTrans&Masof=0010131918&PassP=your-api-password&TransId=405532558&UTF8=True&UTF8out=True"
        );
    }

    #[test]
    fn refuses_commands_hyp_cannot_take() {
        let account = account();
        for (json, needle) in [
            (
                r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"}}"#,
                "amount is required",
            ),
            (
                r#"{"refund_id":"r1","provider":"h","transaction":{"cg_uid":"1"}}"#,
                "transaction.id",
            ),
            (
                r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1&x=2"},"amount":{"minor":1,"currency":"ILS"}}"#,
                "not a Hyp Pay",
            ),
            (
                r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"},"amount":{"minor":1,"currency":"KWD"}}"#,
                "at most 2",
            ),
            (
                r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"},"amount":{"minor":1,"currency":"ILS"},"installments":{}}"#,
                "installments",
            ),
        ] {
            let err = request_for(&command(json), &account).expect_err(json);
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn classifies_the_documented_refund_answers() {
        match classify(
            Operation::Refund,
            "Id=405577499&CCode=0&ACode=0476241&HeshASM=EZ",
        ) {
            ProviderOutcome::Confirmed {
                provider_txn,
                performed,
                code,
                ..
            } => {
                assert_eq!(provider_txn.as_deref(), Some("405577499"));
                assert_eq!(performed, Operation::Refund);
                assert_eq!(code, "0");
            }
            other => panic!("{other:?}"),
        }
        match classify(Operation::Refund, "CCode=33") {
            ProviderOutcome::Declined { code, message } => {
                assert_eq!(code, "33");
                assert!(message.contains("exceeds"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn classifies_the_documented_cancel_answers() {
        match classify(
            Operation::Cancel,
            "TransId=405532558&CCode=0&Hesh=EZ&ReversalStatus=777",
        ) {
            ProviderOutcome::Confirmed {
                provider_txn,
                performed,
                ..
            } => {
                assert_eq!(provider_txn.as_deref(), Some("405532558"));
                assert_eq!(performed, Operation::Cancel);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(Operation::Cancel, "TransId=412701022&CCode=920"),
            ProviderOutcome::Declined { code, .. } if code == "920"
        ));
    }

    #[test]
    fn classifies_system_errors_as_unknown_and_credentials_as_misconfigured() {
        for body in [
            "",
            "<html><body>Error</body></html>",
            "  <!DOCTYPE html>",
            "Id=1&ACode=2",
            "CCode=abc",
        ] {
            assert!(
                matches!(
                    classify(Operation::Refund, body),
                    ProviderOutcome::Unknown { .. }
                ),
                "{body:?}"
            );
        }
        for code in ["999", "009", "599"] {
            assert!(matches!(
                classify(Operation::Refund, &format!("CCode={code}")),
                ProviderOutcome::Unknown { .. }
            ));
        }
        for code in ["901", "902", "903", "996", "997"] {
            assert!(matches!(
                classify(Operation::Refund, &format!("CCode={code}")),
                ProviderOutcome::Misconfigured { .. }
            ));
        }
        // Success is CCode=0 and nothing else.
        assert!(matches!(
            classify(Operation::Refund, "CCode=1"),
            ProviderOutcome::Declined { .. }
        ));
    }
}
