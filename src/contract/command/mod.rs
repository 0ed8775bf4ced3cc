//! The refund command: the JSON body order systems publish (see README,
//! "Message contract"). Parsing separates two kinds of bad input:
//!
//! * [`Poison`]: a message we cannot even attribute to a refund (not JSON, no
//!   usable `refund_id`). It goes to the dead-letter queue with headers.
//! * [`Invalid`]: a message with a good `refund_id` whose content is wrong. It
//!   gets a `refund.rejected` event so the sender learns about it.

mod payout;
mod strict;

pub use payout::{mask_card_tokens, mask_payout_value, CardToken, PayoutEcho, PayoutTarget};
pub use strict::{StrictValue, MAX_DEPTH};

use crate::contract::money::{self, Amount};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest accepted `refund_id`.
pub const MAX_REFUND_ID_LEN: usize = 64;

/// What the command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Refund all or part of a settled charge.
    Refund,
    /// Cancel a charge that was not yet transmitted.
    Cancel,
    /// Credit a card with no earlier charge (Hyp Pay `action=soft`).
    Payout,
}

impl Operation {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Refund => "refund",
            Operation::Cancel => "cancel",
            Operation::Payout => "payout",
        }
    }
}

/// A command that passed the provider-independent checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundCommand {
    /// Idempotency key.
    pub refund_id: String,
    /// Name of a provider account in the configuration.
    pub provider: String,
    /// Refund (default) or cancel.
    #[serde(default = "default_operation")]
    pub operation: Operation,
    /// Reference to the original charge; its shape depends on the provider
    /// kind. Empty (absent) for a payout, which has none.
    #[serde(
        default,
        deserialize_with = "strict::map",
        skip_serializing_if = "Map::is_empty"
    )]
    pub transaction: Map<String, Value>,
    /// Where a payout goes (payouts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout: Option<PayoutTarget>,
    /// Amount to refund; absent means the full amount where the provider allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    /// Amount of the original charge (minor units). When given, the worker
    /// refuses a refund that would make the refunds of that charge exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_amount: Option<u64>,
    /// Installment plan (CreditGuard only).
    #[serde(
        default,
        deserialize_with = "strict::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub installments: Option<Value>,
    /// Echoed in events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Echoed in events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Any JSON, echoed in events.
    #[serde(
        default,
        deserialize_with = "strict::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub metadata: Option<Value>,
}

fn default_operation() -> Operation {
    Operation::Refund
}

/// A message that cannot be tied to a refund: it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Poison {
    /// Short machine-readable reason (`x-refund-error-kind`).
    pub kind: &'static str,
    /// Human-readable detail (`x-refund-error`).
    pub message: String,
}

/// A command with a usable `refund_id` but bad content: it is rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid command {refund_id}: {message}")]
pub struct Invalid {
    /// The refund the rejection is about.
    pub refund_id: String,
    /// What is wrong, naming the field.
    pub message: String,
    /// The fields we could read, echoed in the rejection event.
    pub echo: Echo,
}

/// Fields echoed in every event, taken from whatever the command carried.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    /// `provider` as sent.
    pub provider: Option<String>,
    /// `operation` as sent.
    pub operation: Option<Operation>,
    /// `amount` as sent (when well-formed).
    pub amount: Option<Amount>,
    /// `order_id` as sent.
    pub order_id: Option<String>,
    /// `metadata` as sent.
    pub metadata: Option<Value>,
    /// A payout's card, by its last four digits.
    pub payout: Option<PayoutEcho>,
}

/// Why parsing stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// Dead-letter it.
    #[error(transparent)]
    Poison(#[from] Poison),
    /// Reject it with an event.
    #[error(transparent)]
    Invalid(#[from] Box<Invalid>),
}

/// Checks a `refund_id`: 1–64 characters of `A-Z a-z 0-9 . _ : -`.
pub fn check_refund_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_REFUND_ID_LEN {
        return Err(format!(
            "refund_id must be 1 to {MAX_REFUND_ID_LEN} characters, got {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "refund_id contains {c:?}; allowed are A-Z a-z 0-9 . _ : -"
        ));
    }
    // `.` and `..` are path segments every HTTP client removes, so the
    // refund's callback URL could never reach it.
    if id.bytes().all(|b| b == b'.') {
        return Err("refund_id must not be made of dots only".into());
    }
    Ok(())
}

impl RefundCommand {
    /// Parses and checks a message body.
    ///
    /// A well-formed command (nearly every one) is read straight into the
    /// struct in one pass. Anything that pass or the checks refuse is read
    /// again the careful way ([`RefundCommand::parse_diagnosed`]), which
    /// names what is wrong and echoes what it can; it accepts everything
    /// the straight pass accepts, so the two never disagree on a command.
    pub fn parse(body: &[u8]) -> Result<Self, ParseError> {
        if let Ok(command) = serde_json::from_slice::<RefundCommand>(body) {
            if check_refund_id(&command.refund_id).is_ok() && command.check().is_ok() {
                return Ok(command);
            }
        }
        Self::parse_diagnosed(body)
    }

    /// The careful parse: through a JSON value, so that a bad body is told
    /// apart from a body without a usable `refund_id` (poison) and from a
    /// command with a good `refund_id` and bad content (invalid, answered
    /// with an event that echoes what could be read).
    fn parse_diagnosed(body: &[u8]) -> Result<Self, ParseError> {
        let value = match read_strict(body) {
            Ok(value) => value,
            Err(refused) => return Err(refused.into_error(body)),
        };
        let Value::Object(object) = value else {
            return Err(Poison {
                kind: "malformed",
                message: "body is JSON but not an object".into(),
            }
            .into());
        };
        let refund_id = match object.get("refund_id") {
            Some(Value::String(id)) => id.clone(),
            Some(_) => {
                return Err(Poison {
                    kind: "invalid_refund_id",
                    message: "refund_id is not a string".into(),
                }
                .into())
            }
            None => {
                return Err(Poison {
                    kind: "missing_refund_id",
                    message: "refund_id is missing".into(),
                }
                .into())
            }
        };
        check_refund_id(&refund_id).map_err(|message| Poison {
            kind: "invalid_refund_id",
            message,
        })?;

        let echo = Echo::from_object(&object);
        let invalid = |message: String| {
            Box::new(Invalid {
                refund_id: refund_id.clone(),
                message,
                echo: echo.clone(),
            })
        };
        let command: RefundCommand =
            serde_path_to_error::deserialize(Value::Object(object.clone())).map_err(|e| {
                let path = e.path().to_string();
                let message = format!("{path}: {}", e.into_inner());
                // serde quotes a value of the wrong type; under `payout` it
                // can be the card token.
                invalid(if path.starts_with("payout") {
                    payout::mask_digit_runs(&message)
                } else {
                    message
                })
            })?;
        command.check().map_err(invalid)?;
        Ok(command)
    }

    /// Provider-independent checks.
    fn check(&self) -> Result<(), String> {
        if self.provider.trim().is_empty() {
            return Err("provider must not be empty".into());
        }
        self.check_operation()?;
        if let Some(amount) = &self.amount {
            if !money::is_known_currency(&amount.currency) {
                return Err(format!(
                    "amount.currency {:?} is not a known ISO 4217 code",
                    amount.currency
                ));
            }
            if amount.minor == 0 {
                return Err(
                    "amount.minor must be greater than 0 (omit amount for a full refund)".into(),
                );
            }
            if self.operation == Operation::Cancel {
                return Err("a cancel takes no amount".into());
            }
        }
        if let Some(original) = self.original_amount {
            if original == 0 {
                return Err("original_amount must be greater than 0".into());
            }
            if let Some(amount) = &self.amount {
                if amount.minor > original {
                    return Err(format!(
                        "amount.minor {} exceeds original_amount {original}",
                        amount.minor
                    ));
                }
            }
        }
        for (field, value) in [("order_id", &self.order_id), ("reason", &self.reason)] {
            if value.as_ref().is_some_and(|v| v.len() > 256) {
                return Err(format!("{field} is longer than 256 characters"));
            }
        }
        Ok(())
    }

    /// What each operation needs and refuses: a refund or a cancel names
    /// the original charge; a payout names a card instead, and an amount.
    fn check_operation(&self) -> Result<(), String> {
        if self.operation != Operation::Payout {
            if self.payout.is_some() {
                return Err("payout is only for operation \"payout\"".into());
            }
            if self.transaction.is_empty() {
                return Err("transaction must name the original charge".into());
            }
            return Ok(());
        }
        if self.payout.is_none() {
            return Err("payout (the card to credit) is required for operation \"payout\"".into());
        }
        if !self.transaction.is_empty() {
            return Err("transaction is not used by a payout (it has no original charge)".into());
        }
        if self.amount.is_none() {
            return Err("amount is required for a payout".into());
        }
        if self.original_amount.is_some() {
            return Err("original_amount is not used by a payout".into());
        }
        if self.installments.is_some() {
            return Err("installments are not used by a payout".into());
        }
        Ok(())
    }

    /// Hash of the normalised command (defaults filled, keys sorted), used to
    /// tell a redelivery from a different command re-using a `refund_id`.
    /// A payout's card token is hashed masked, so that the masked copy a
    /// dead letter carries is the same command when it is replayed.
    pub fn payload_hash(&self) -> String {
        // serde_json's Map is ordered by key, so this is canonical.
        let canonical = match &self.payout {
            Some(_) => serde_json::to_vec(&self.masked()),
            None => serde_json::to_vec(self),
        }
        .unwrap_or_default();
        hex(&Sha256::digest(&canonical))
    }

    /// The command as it may be shown outside the worker: a payout's card
    /// token masked to its last four digits.
    pub fn masked(&self) -> RefundCommand {
        RefundCommand {
            payout: self.payout.as_ref().map(PayoutTarget::masked),
            ..self.clone()
        }
    }

    /// Whether this command carries a masked card token (a copy read back
    /// from a dead letter): it can be matched with its record, never sent.
    pub fn has_masked_token(&self) -> bool {
        self.payout
            .as_ref()
            .is_some_and(|p| p.card_token.is_masked())
    }

    /// Fields echoed in events.
    pub fn echo(&self) -> Echo {
        Echo {
            provider: Some(self.provider.clone()),
            operation: Some(self.operation),
            amount: self.amount.clone(),
            order_id: self.order_id.clone(),
            metadata: self.metadata.clone(),
            payout: self.payout.as_ref().map(PayoutTarget::echo),
        }
    }

    /// A string field of `transaction`, if present and non-empty.
    pub fn transaction_str(&self, key: &str) -> Option<&str> {
        match self.transaction.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.as_str()),
            _ => None,
        }
    }
}

/// Why a body could not be read strictly.
enum Refused {
    /// Not JSON at all.
    NotJson(String),
    /// JSON with a key twice, or nested too deep: where, and what.
    Strict(String),
}

fn read_strict(body: &[u8]) -> Result<Value, Refused> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, StrictValue>(&mut reader);
    if value.is_ok() {
        if let Err(e) = reader.end() {
            return Err(Refused::NotJson(e.to_string()));
        }
    }
    match value {
        Ok(StrictValue(value)) => Ok(value),
        Err(e) if e.inner().is_data() => {
            let path = e.path().to_string();
            let at = if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            };
            Err(Refused::Strict(format!("{at}{}", e.into_inner())))
        }
        Err(e) => Err(Refused::NotJson(e.into_inner().to_string())),
    }
}

impl Refused {
    /// A refusal names the refund when its `refund_id` can be read (and is
    /// not itself what is wrong); otherwise the message is poison.
    fn into_error(self, body: &[u8]) -> ParseError {
        let message = match self {
            Refused::NotJson(e) => {
                return Poison {
                    kind: "malformed",
                    message: format!("body is not JSON: {e}"),
                }
                .into()
            }
            Refused::Strict(message) => message,
        };
        let lenient: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
        let refund_id = lenient
            .as_ref()
            .and_then(|o| o.get("refund_id"))
            .and_then(Value::as_str)
            .filter(|id| check_refund_id(id).is_ok())
            .filter(|_| !message.starts_with("the key \"refund_id\""));
        match (refund_id, &lenient) {
            (Some(id), Some(object)) => Box::new(Invalid {
                refund_id: id.to_string(),
                message: format!("the body is not acceptable JSON: {message}"),
                echo: Echo::from_object(object),
            })
            .into(),
            _ => Poison {
                kind: "malformed",
                message: format!("the body is not acceptable JSON: {message}"),
            }
            .into(),
        }
    }
}

impl Echo {
    /// The `refund_id` (when it is a valid one) and the echo fields of a
    /// body that is not read as a command (too large, the wrong content
    /// type): read leniently, for a rejection that names the refund.
    pub fn of_body(body: &[u8]) -> Option<(String, Echo)> {
        let object: Map<String, Value> = serde_json::from_slice(body).ok()?;
        let refund_id = object.get("refund_id")?.as_str()?;
        check_refund_id(refund_id).ok()?;
        Some((refund_id.to_string(), Echo::from_object(&object)))
    }

    fn from_object(object: &Map<String, Value>) -> Self {
        let string = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
        Echo {
            provider: string("provider"),
            operation: match object.get("operation") {
                None => Some(Operation::Refund),
                Some(v) => serde_json::from_value(v.clone()).ok(),
            },
            amount: object
                .get("amount")
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            order_id: string("order_id"),
            metadata: object.get("metadata").cloned(),
            payout: object
                .get("payout")
                .and_then(|p| p.get("card_token"))
                .and_then(Value::as_str)
                .filter(|t| t.len() >= 4 && t.is_ascii())
                .map(|t| PayoutEcho {
                    card_last4: t[t.len() - 4..].to_string(),
                }),
        }
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    // On the hot path (the payload hash of every command): no formatting
    // machinery, one allocation.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUND: &str = include_str!("../../../examples/hyp-pay-refund.json");
    const CANCEL: &str = include_str!("../../../examples/hyp-pay-cancel.json");

    #[test]
    fn parses_the_examples() {
        let refund = RefundCommand::parse(REFUND.as_bytes()).expect("refund example");
        assert_eq!(refund.operation, Operation::Refund);
        assert_eq!(refund.amount.as_ref().map(|a| a.minor), Some(1050));
        let cancel = RefundCommand::parse(CANCEL.as_bytes()).expect("cancel example");
        assert_eq!(cancel.operation, Operation::Cancel);
        assert!(cancel.amount.is_none());
    }

    #[test]
    fn not_json_is_poison() {
        let err = RefundCommand::parse(b"hello").expect_err("poison");
        assert!(matches!(
            err,
            ParseError::Poison(Poison {
                kind: "malformed",
                ..
            })
        ));
        let err = RefundCommand::parse(b"[1]").expect_err("poison");
        assert!(matches!(
            err,
            ParseError::Poison(Poison {
                kind: "malformed",
                ..
            })
        ));
    }

    #[test]
    fn missing_or_bad_refund_id_is_poison() {
        let err = RefundCommand::parse(br#"{"provider":"x"}"#).expect_err("poison");
        assert!(matches!(
            err,
            ParseError::Poison(Poison {
                kind: "missing_refund_id",
                ..
            })
        ));
        let err = RefundCommand::parse(br#"{"refund_id":"a b"}"#).expect_err("poison");
        assert!(matches!(
            err,
            ParseError::Poison(Poison {
                kind: "invalid_refund_id",
                ..
            })
        ));
        let long = format!(r#"{{"refund_id":"{}"}}"#, "a".repeat(65));
        assert!(RefundCommand::parse(long.as_bytes()).is_err());
    }

    #[test]
    fn bad_content_is_invalid_and_names_the_field() {
        let cases = [
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"amount":{"minor":10.5,"currency":"ILS"}}"#,
                "invalid type",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"amount":{"minor":-1,"currency":"ILS"}}"#,
                "invalid value",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"amount":{"minor":100,"currency":"XXX"}}"#,
                "amount.currency",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{}}"#,
                "transaction",
            ),
            (r#"{"refund_id":"r1","transaction":{"id":"1"}}"#, "provider"),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"ammount":1}"#,
                "ammount",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","operation":"cancel","transaction":{"id":"1"},"amount":{"minor":1,"currency":"ILS"}}"#,
                "cancel takes no amount",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","operation":"void","transaction":{"id":"1"}}"#,
                "void",
            ),
        ];
        for (body, needle) in cases {
            match RefundCommand::parse(body.as_bytes()) {
                Err(ParseError::Invalid(inv)) => {
                    assert_eq!(inv.refund_id, "r1");
                    assert!(inv.message.contains(needle), "{body}: {}", inv.message);
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_key_twice_is_an_invalid_command_or_poison_when_it_is_the_refund_id() {
        for (body, needle) in [
            (
                r#"{"refund_id":"r1","provider":"p","provider":"q","transaction":{"id":"1"}}"#,
                "\"provider\" appears twice",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1","id":"2"}}"#,
                "transaction: the key \"id\" appears twice",
            ),
            (
                r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"metadata":{"a":{"b":1,"b":1}}}"#,
                "metadata.a: the key \"b\" appears twice",
            ),
        ] {
            match RefundCommand::parse(body.as_bytes()) {
                Err(ParseError::Invalid(inv)) => {
                    assert_eq!(inv.refund_id, "r1");
                    assert!(inv.message.contains(needle), "{body}: {}", inv.message);
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // Which refund is it? Neither can be trusted.
        let twice =
            r#"{"refund_id":"r1","refund_id":"r2","provider":"p","transaction":{"id":"1"}}"#;
        assert!(matches!(
            RefundCommand::parse(twice.as_bytes()),
            Err(ParseError::Poison(Poison {
                kind: "malformed",
                ..
            }))
        ));
    }

    #[test]
    fn metadata_nested_deeper_than_a_record_can_hold_is_invalid() {
        let deep = |n: usize| {
            format!(
                r#"{{"refund_id":"r1","provider":"p","transaction":{{"id":"1"}},"metadata":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(RefundCommand::parse(deep(MAX_DEPTH - 1).as_bytes()).is_ok());
        match RefundCommand::parse(deep(120).as_bytes()) {
            Err(ParseError::Invalid(inv)) => {
                assert!(
                    inv.message.contains("nested deeper than 32"),
                    "{}",
                    inv.message
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refund_ids_of_dots_only_are_poison() {
        for id in [".", ".."] {
            let body =
                format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#);
            assert!(matches!(
                RefundCommand::parse(body.as_bytes()),
                Err(ParseError::Poison(Poison {
                    kind: "invalid_refund_id",
                    ..
                }))
            ));
        }
        assert!(check_refund_id("a.b").is_ok());
    }

    #[test]
    fn hash_ignores_key_order_and_defaults() {
        let a = RefundCommand::parse(
            br#"{"refund_id":"r1","provider":"p","transaction":{"id":"1","x":"y"}}"#,
        )
        .expect("a");
        let b = RefundCommand::parse(br#"{"transaction":{"x":"y","id":"1"},"operation":"refund","provider":"p","refund_id":"r1"}"#).expect("b");
        assert_eq!(a.payload_hash(), b.payload_hash());
        let c =
            RefundCommand::parse(br#"{"refund_id":"r1","provider":"p","transaction":{"id":"2"}}"#)
                .expect("c");
        assert_ne!(a.payload_hash(), c.payload_hash());
    }

    #[test]
    fn the_straight_parse_and_the_careful_one_agree() {
        let examples = [
            include_str!("../../../examples/creditguard-cancel.json"),
            include_str!("../../../examples/creditguard-fallback-cancel.json"),
            include_str!("../../../examples/creditguard-installments.json"),
            include_str!("../../../examples/creditguard-refund.json"),
            include_str!("../../../examples/hyp-pay-cancel.json"),
            include_str!("../../../examples/hyp-pay-decline.json"),
            include_str!("../../../examples/hyp-pay-refund.json"),
            include_str!("../../../examples/invalid-command.json"),
            include_str!("../../../examples/paynet-refund.json"),
        ];
        let variants = [
            r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"metadata":{"a":[1,2.5,null]}}"#,
            r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"order_id":null,"amount":null}"#,
            // A duplicate key: both refuse it.
            r#"{"refund_id":"r1","provider":"p","provider":"q","transaction":{"id":"1"}}"#,
            r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1","id":"2"}}"#,
            r#"{"refund_id":"r 1","provider":"p","transaction":{"id":"1"}}"#,
            r#"{"refund_id":"r1","provider":"","transaction":{"id":"1"}}"#,
            r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"amount":{"minor":1.5,"currency":"ILS"}}"#,
            r#"{"refund_id":"r1","provider":"p","transaction":{"id":"1"},"unknown":1}"#,
            r#"{"refund_id":1}"#,
            "[]",
            "not json",
        ];
        for body in examples.iter().chain(variants.iter()) {
            assert_eq!(
                RefundCommand::parse(body.as_bytes()),
                RefundCommand::parse_diagnosed(body.as_bytes()),
                "{body}"
            );
        }
        // The examples that are commands take the straight way.
        let straight = examples
            .iter()
            .filter(|body| serde_json::from_slice::<RefundCommand>(body.as_bytes()).is_ok())
            .count();
        assert!(straight >= 8, "{straight} examples parsed straight");
    }
}
