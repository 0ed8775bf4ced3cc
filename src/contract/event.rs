//! The outcome event the worker publishes to `refunds.events` with routing key
//! `refund.<status>`. Its `event_id` is derived from `(refund_id, status)`, so
//! a re-publication after a redelivery or a restart carries the same id and
//! consumers can deduplicate on it.

use crate::contract::command::{Echo, Operation, PayoutEcho};
use crate::contract::money::Amount;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The outcome of one refund as accounting sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The provider confirmed the refund or cancellation.
    Succeeded,
    /// The provider declined it with a final answer.
    Failed,
    /// The worker refused the command before any provider call.
    Rejected,
    /// The provider accepted it and will decide later.
    Pending,
    /// It may or may not have been executed; a person must reconcile it.
    InDoubt,
}

impl Status {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Pending => "pending",
            Status::InDoubt => "in_doubt",
        }
    }

    /// Routing key and AMQP `type`: `refund.<status>`.
    pub fn routing_key(self) -> String {
        format!("refund.{}", self.as_str())
    }
}

/// Why a refund did not succeed, in the worker's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    /// Machine-readable kind: `invalid_command`, `unknown_provider`,
    /// `conflicting_payload`, `declined`, `outcome_unknown`, ...
    pub kind: String,
    /// Human-readable detail. Never contains credentials.
    pub message: String,
}

/// The event body (see README, "Message contract").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    /// Stable per `(refund_id, status)`.
    pub event_id: String,
    /// The command's idempotency key.
    pub refund_id: String,
    /// The outcome.
    pub status: Status,
    /// Provider account named by the command.
    pub provider: Option<String>,
    /// What the command asked for.
    pub operation: Option<Operation>,
    /// What the provider performed (a refund may be performed as a cancel).
    pub performed: Option<Operation>,
    /// The command's amount, if it had one.
    pub amount: Option<Amount>,
    /// The provider's id of the new refund/cancel transaction.
    pub provider_transaction_id: Option<String>,
    /// The provider's status code.
    pub provider_code: Option<String>,
    /// The provider's message.
    pub provider_message: Option<String>,
    /// The worker's reason when not succeeded.
    pub error: Option<EventError>,
    /// Provider calls made for this refund.
    pub attempts: u32,
    /// Echoed from the command.
    pub order_id: Option<String>,
    /// Echoed from the command.
    pub metadata: Option<Value>,
    /// A payout's card by its last four digits (payouts only; the token
    /// itself never leaves the worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout: Option<PayoutEcho>,
    /// When the outcome was decided (RFC 3339, UTC).
    pub occurred_at: String,
}

/// Derives the stable event id: a UUID-shaped digest of `refund_id` and status.
pub fn event_id(refund_id: &str, status: Status) -> String {
    let digest = Sha256::digest(format!("{refund_id}\n{}", status.as_str()).as_bytes());
    uuid_shape(&digest)
}

/// An RFC 9562 version 8 UUID ("custom": here a SHA-256 name-based id)
/// from the first 16 bytes of a digest (`uuid` sets the version and
/// variant bits). Deterministic, so a re-publication carries the same id.
fn uuid_shape(digest: &[u8]) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Uuid::new_v8(bytes).hyphenated().to_string()
}

/// Current time as RFC 3339.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

impl OutcomeEvent {
    /// A new event for `refund_id` with the echoed fields filled in.
    pub fn new(refund_id: &str, status: Status, echo: &Echo, attempts: u32) -> Self {
        OutcomeEvent {
            event_id: event_id(refund_id, status),
            refund_id: refund_id.to_string(),
            status,
            provider: echo.provider.clone(),
            operation: echo.operation,
            performed: None,
            amount: echo.amount.clone(),
            provider_transaction_id: None,
            provider_code: None,
            provider_message: None,
            error: None,
            attempts,
            order_id: echo.order_id.clone(),
            metadata: echo.metadata.clone(),
            payout: echo.payout.clone(),
            occurred_at: now_rfc3339(),
        }
    }

    /// Marks the `n`-th in-doubt episode of a refund (1 for the first): from
    /// the second on, the event id also covers the episode number, so a
    /// consumer that dedupes on `event_id` still sees a new episode. The
    /// first keeps the id derived from `(refund_id, status)` alone.
    pub fn episode(mut self, n: u32) -> Self {
        if n > 1 {
            let digest = Sha256::digest(
                format!("{}\n{}\n{n}", self.refund_id, self.status.as_str()).as_bytes(),
            );
            self.event_id = uuid_shape(&digest);
        }
        self
    }

    /// Sets the worker's error.
    pub fn with_error(mut self, kind: &str, message: impl Into<String>) -> Self {
        self.error = Some(EventError {
            kind: kind.to_string(),
            message: message.into(),
        });
        self
    }

    /// Whether this status ends the refund's life (no other event follows).
    pub fn is_final(&self) -> bool {
        !matches!(self.status, Status::Pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_stable_per_refund_and_status() {
        let a = event_id("rf-1", Status::Succeeded);
        assert_eq!(a, event_id("rf-1", Status::Succeeded));
        assert_ne!(a, event_id("rf-1", Status::Failed));
        assert_ne!(a, event_id("rf-2", Status::Succeeded));
        assert_eq!(a.len(), 36);
        // Pinned: the ids of events already published must not change
        // (SHA-256 of "rf-1\nsucceeded", version and variant bits set).
        assert_eq!(a, "47e58fee-fe60-82b7-a066-0b6647819aee");
        // The example refund of the README's quick start.
        assert_eq!(
            event_id("rf-example-hyp-refund-1", Status::Succeeded),
            "20d20838-40b7-8ca3-b9f2-0e3209213aa7"
        );
        // RFC 9562 version 8, variant 10.
        assert_eq!(&a[14..15], "8", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn in_doubt_episodes_have_their_own_ids_and_the_first_keeps_todays() {
        let echo = Echo::default();
        let first = OutcomeEvent::new("rf-1", Status::InDoubt, &echo, 1).episode(1);
        assert_eq!(first.event_id, event_id("rf-1", Status::InDoubt));
        let second = OutcomeEvent::new("rf-1", Status::InDoubt, &echo, 2).episode(2);
        let again = OutcomeEvent::new("rf-1", Status::InDoubt, &echo, 2).episode(2);
        assert_ne!(second.event_id, first.event_id);
        assert_eq!(second.event_id, again.event_id);
        assert_eq!(second.event_id.len(), 36);
    }

    #[test]
    fn serialises_to_the_contract_shape() {
        let echo = Echo {
            provider: Some("hyp_pay".into()),
            operation: Some(Operation::Refund),
            amount: Some(Amount {
                minor: 1050,
                currency: "ILS".into(),
            }),
            order_id: Some("ord-1".into()),
            metadata: None,
            payout: None,
        };
        let event = OutcomeEvent::new("rf-1", Status::InDoubt, &echo, 1);
        let json: Value = serde_json::to_value(&event).expect("json");
        for key in [
            "event_id",
            "refund_id",
            "status",
            "provider",
            "operation",
            "performed",
            "amount",
            "provider_transaction_id",
            "provider_code",
            "provider_message",
            "error",
            "attempts",
            "order_id",
            "metadata",
            "occurred_at",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["status"], "in_doubt");
        assert_eq!(json["amount"]["minor"], 1050);
        assert_eq!(Status::InDoubt.routing_key(), "refund.in_doubt");
    }
}
