//! The provider's answer → one [`ProviderOutcome`].

use crate::contract::command::Operation;
use crate::providers::ProviderOutcome;
use serde::{Deserialize, Serialize};

/// `<element code="52">Cancel</element>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coded {
    /// The `code` attribute.
    #[serde(rename = "@code", default)]
    pub code: Option<String>,
    /// The text.
    #[serde(rename = "$text", default)]
    pub text: Option<String>,
}

/// The answer document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "ashrait")]
pub struct ResponseDoc {
    /// The response.
    pub response: Response,
}

/// `<response>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Echo of the command.
    #[serde(default)]
    pub command: Option<String>,
    /// Server time.
    #[serde(rename = "dateTime", default)]
    pub date_time: Option<String>,
    /// Echo of our requestId.
    #[serde(rename = "requestId", default)]
    pub request_id: Option<String>,
    /// The new transaction's id.
    #[serde(rename = "tranId", default)]
    pub tran_id: Option<String>,
    /// `000` on success.
    #[serde(default)]
    pub result: Option<String>,
    /// Message.
    #[serde(default)]
    pub message: Option<String>,
    /// Message for end users.
    #[serde(rename = "userMessage", default)]
    pub user_message: Option<String>,
    /// Extra detail.
    #[serde(rename = "additionalInfo", default)]
    pub additional_info: Option<String>,
    /// Protocol version.
    #[serde(default)]
    pub version: Option<String>,
    /// Language.
    #[serde(default)]
    pub language: Option<String>,
    /// The refund block.
    #[serde(rename = "refundDeal", default)]
    pub refund_deal: Option<DealResponse>,
    /// The cancel block.
    #[serde(rename = "cancelDeal", default)]
    pub cancel_deal: Option<DealResponse>,
}

/// The command block of an answer (the documented fields; the rest is
/// ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealResponse {
    /// `000` on success.
    #[serde(default)]
    pub status: Option<String>,
    /// Status text.
    #[serde(rename = "statusText", default)]
    pub status_text: Option<String>,
    /// Terminal.
    #[serde(rename = "terminalNumber", default)]
    pub terminal_number: Option<String>,
    /// Card token.
    #[serde(rename = "cardId", default)]
    pub card_id: Option<String>,
    /// Masked card number.
    #[serde(rename = "cardMask", default)]
    pub card_mask: Option<String>,
    /// `code="52"` Cancel when a refundDeal fell back to cancelling.
    #[serde(rename = "transactionType", default)]
    pub transaction_type: Option<Coded>,
    /// Credit type.
    #[serde(rename = "creditType", default)]
    pub credit_type: Option<Coded>,
    /// Currency.
    #[serde(default)]
    pub currency: Option<Coded>,
    /// Amount refunded (subunits).
    #[serde(default)]
    pub total: Option<String>,
    /// Number of payments.
    #[serde(rename = "numberOfPayments", default)]
    pub number_of_payments: Option<String>,
    /// Authorization number.
    #[serde(rename = "authNumber", default)]
    pub auth_number: Option<String>,
    /// Links to the original.
    #[serde(rename = "cgUid", default)]
    pub cg_uid: Option<String>,
    /// The `user` field.
    #[serde(default)]
    pub user: Option<String>,
}

/// The `transactionType` code of a cancellation.
pub const TRANSACTION_TYPE_CANCEL: &str = "52";

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Parses an answer document.
pub fn parse_response(xml: &str) -> Result<ResponseDoc, String> {
    quick_xml::de::from_str(xml.trim()).map_err(|e| e.to_string())
}

/// Turns a 200 answer's body into an outcome.
pub fn classify(operation: Operation, body: &str) -> ProviderOutcome {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return ProviderOutcome::Unknown {
            reason: "empty answer from CreditGuard".into(),
        };
    }
    if trimmed.to_ascii_lowercase().contains("<html") {
        return ProviderOutcome::Unknown {
            reason: "HTML answer from CreditGuard (system error)".into(),
        };
    }
    let doc = match parse_response(trimmed) {
        Ok(doc) => doc,
        Err(e) => {
            return ProviderOutcome::Unknown {
                reason: format!("unparsable CreditGuard answer: {e}"),
            }
        }
    };
    let response = doc.response;
    let Some(result) = nonempty(&response.result) else {
        return ProviderOutcome::Unknown {
            reason: "CreditGuard answer without result".into(),
        };
    };
    let block = match operation {
        Operation::Refund | Operation::Payout => response.refund_deal.as_ref(),
        Operation::Cancel => response.cancel_deal.as_ref(),
    };
    let status = block.and_then(|b| nonempty(&b.status));
    let message = nonempty(&response.message)
        .or_else(|| block.and_then(|b| nonempty(&b.status_text)))
        .unwrap_or_default();
    if result == "000" {
        if status.as_deref().is_some_and(|s| s != "000") {
            return ProviderOutcome::Unknown {
                reason: format!(
                    "CreditGuard result 000 but status {}",
                    status.unwrap_or_default()
                ),
            };
        }
        let performed = match operation {
            Operation::Cancel => Operation::Cancel,
            Operation::Refund | Operation::Payout => {
                let cancelled = block
                    .and_then(|b| b.transaction_type.as_ref())
                    .and_then(|t| t.code.as_deref())
                    == Some(TRANSACTION_TYPE_CANCEL);
                if cancelled {
                    Operation::Cancel
                } else {
                    Operation::Refund
                }
            }
        };
        return ProviderOutcome::Confirmed {
            provider_txn: nonempty(&response.tran_id),
            performed,
            code: result,
            message: Some(message),
        };
    }
    let code: u32 = result.parse().unwrap_or(u32::MAX);
    match code {
        // Terminal not permitted to cancel / refund: the account, not the refund.
        319 | 324 => ProviderOutcome::Misconfigured {
            code: result,
            message,
        },
        // Shva/issuer decisions and the documented refund/cancel errors.
        1..=299 | 310..=341 => ProviderOutcome::Declined {
            code: result,
            message,
        },
        // Anything undocumented may hide an executed refund: a person checks.
        _ => ProviderOutcome::Unknown {
            reason: format!("CreditGuard result {result}: {message}"),
        },
    }
}
