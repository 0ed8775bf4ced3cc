//! The provider's answer → one [`ProviderOutcome`].

use crate::contract::command::Operation;
use crate::providers::ProviderOutcome;

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

/// A URL-encoded answer with a numeric `CCode`.
#[derive(Debug)]
pub struct Answer {
    /// `CCode` as a number.
    pub code: u32,
    /// `CCode` as sent.
    pub raw_code: String,
    fields: Vec<(String, String)>,
}

impl Answer {
    /// A field's trimmed value.
    pub fn get(&self, key: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
    }
}

/// Reads a 200 answer's body, or says why its outcome is unknown (an empty
/// or HTML page, no readable `CCode`).
pub fn read_answer(body: &str) -> Result<Answer, ProviderOutcome> {
    let unknown = |reason: String| Err(ProviderOutcome::Unknown { reason });
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return unknown("empty answer from Hyp Pay".into());
    }
    if trimmed.starts_with('<') || trimmed.to_ascii_lowercase().contains("<html") {
        return unknown("HTML answer from Hyp Pay (system error)".into());
    }
    let Some(fields) = parse_fields(trimmed) else {
        return unknown("answer is not URL-encoded".into());
    };
    let mut answer = Answer {
        code: 0,
        raw_code: String::new(),
        fields,
    };
    let Some(raw_code) = answer.get("CCode") else {
        return unknown("answer has no CCode".into());
    };
    let Ok(code) = raw_code.parse::<u32>() else {
        return unknown(format!("CCode {raw_code:?} is not a number"));
    };
    answer.code = code;
    answer.raw_code = raw_code;
    Ok(answer)
}

/// Turns a 200 answer's body into an outcome.
pub fn classify(operation: Operation, body: &str) -> ProviderOutcome {
    let answer = match read_answer(body) {
        Ok(answer) => answer,
        Err(unknown) => return unknown,
    };
    let (code, raw_code) = (answer.code, answer.raw_code.clone());
    let get = |key: &str| answer.get(key);
    let message = describe(code).to_string();
    match code {
        0 => ProviderOutcome::Confirmed {
            provider_txn: match operation {
                Operation::Refund | Operation::Payout => get("Id"),
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
