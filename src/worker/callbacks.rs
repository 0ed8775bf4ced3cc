//! Provider callbacks: Paynet posts the final answer of a refund it
//! accepted to the refund's `succeedUrl`. The callback is not signed, so it
//! must carry the refund's unguessable token; it moves the refund to its
//! final state once and never publishes a second, different final event.

use super::Worker;
use crate::event::{OutcomeEvent, Status};
use crate::metrics;
use crate::store::ledger::Reservation;
use crate::store::{RefundState, StoreError};
use tracing::{error, info, warn};

/// What a provider callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The pending refund got its final outcome (event published).
    Finalised(Status),
    /// The same final answer again: recorded, nothing new published.
    Repeated,
    /// A different answer after a final one: recorded and logged for a
    /// person; no second final event.
    Contradicted,
}

/// Why a callback was refused.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// Unknown refund or wrong token (a forged or misrouted callback).
    #[error("no pending refund matches this callback")]
    NotFound,
    /// The body is not a Paynet callback.
    #[error("{0}")]
    Invalid(String),
    /// The refund is not waiting for a callback.
    #[error("refund {0} is not waiting for a provider callback")]
    NotPending(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recorded, but the event could not be published yet.
    #[error("recorded, but the event was not published ({0}); a repeated callback or a redelivery publishes it")]
    Publish(String),
}

impl Worker {
    /// Handles Paynet's post to a refund's `succeedUrl`. The callback is not
    /// signed, so it must carry the refund's unguessable token, and it only
    /// ever moves a `pending` refund to its final state once.
    pub async fn paynet_callback(
        &self,
        refund_id: &str,
        token: &str,
        body: &[u8],
    ) -> Result<CallbackOutcome, CallbackError> {
        let callback =
            crate::providers::paynet::wire::parse_callback(body).map_err(CallbackError::Invalid)?;
        let _guard = self.locks.lock(refund_id).await;
        let Some(mut record) = self.store.get(refund_id)? else {
            warn!(refund_id, "callback for an unknown refund ignored");
            return Err(CallbackError::NotFound);
        };
        if !constant_time_eq(record.callback_token.as_bytes(), token.as_bytes()) {
            warn!(
                refund_id,
                "callback with a wrong token ignored (forged or misrouted)"
            );
            return Err(CallbackError::NotFound);
        }
        let status = if callback.approved {
            Status::Succeeded
        } else {
            Status::Failed
        };
        let note = format!(
            "callback: code {} status {:?} xact_id {:?} message {:?}",
            callback.code, callback.status, callback.xact_id, callback.message
        );
        match record.state.clone() {
            RefundState::Pending { .. } => {
                let mut event =
                    OutcomeEvent::new(refund_id, status, &record.command.echo(), record.attempts);
                event.performed = callback.approved.then_some(record.command.operation);
                event.provider_transaction_id =
                    Some(callback.xact_id.clone()).filter(|x| !x.is_empty());
                event.provider_code = Some(callback.code.clone());
                event.provider_message = Some(callback.message.clone());
                if !callback.approved {
                    event = event.with_error(
                        "declined",
                        format!("provider disapproved: {}", callback.message),
                    );
                }
                record.transition(
                    RefundState::Finished {
                        event: event.clone(),
                    },
                    note,
                );
                self.store.put(&record)?;
                let reservation = callback.approved.then_some(Reservation::Succeeded);
                self.store.settle(&record.command, reservation)?;
                self.store.sync().await?;
                metrics::outcome(&record.command.provider, status.as_str());
                info!(
                    refund_id,
                    provider = record.command.provider.as_str(),
                    status = status.as_str(),
                    attempts = record.attempts,
                    "refund outcome"
                );
                self.publish_outside_delivery(&event)
                    .await
                    .map_err(CallbackError::Publish)?;
                Ok(CallbackOutcome::Finalised(status))
            }
            RefundState::Finished { event } if event.status == status => {
                record.transition(record.state.clone(), format!("repeated {note}"));
                self.store.put(&record)?;
                // Publishing again is harmless (same event_id) and covers a
                // first publication that failed.
                let _ = self.publish_outside_delivery(&event).await;
                Ok(CallbackOutcome::Repeated)
            }
            RefundState::Finished { event } => {
                error!(
                    refund_id,
                    recorded = event.status.as_str(),
                    received = status.as_str(),
                    "contradictory provider callback: recorded, no new event; a person must reconcile it"
                );
                metrics::contradiction(&record.command.provider);
                record.transition(
                    record.state.clone(),
                    format!("CONTRADICTS the recorded {}: {note}", event.status.as_str()),
                );
                self.store.put(&record)?;
                self.store.sync().await?;
                Ok(CallbackOutcome::Contradicted)
            }
            other => Err(CallbackError::NotPending(format!(
                "{refund_id} ({})",
                other.name()
            ))),
        }
    }
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
