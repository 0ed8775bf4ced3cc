//! Operator decisions over stored refunds, through the worker's HTTP API
//! (the worker holds the store's lock): settling an in-doubt refund after
//! checking with the provider. Every decision is noted in the refund's
//! history with who and why, and logged.

use super::Worker;
use crate::event::{OutcomeEvent, Status};
use crate::metrics;
use crate::store::ledger::Reservation;
use crate::store::{RefundRecord, RefundState, StoreError};
use tracing::warn;

/// How an operator settled an in-doubt refund after checking with the
/// provider. Exactly one of `executed` and `not_executed`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resolution {
    /// The provider executed it: its transaction id.
    #[serde(default)]
    pub executed: Option<String>,
    /// The provider did not execute it: allow one new attempt (via replay).
    #[serde(default)]
    pub not_executed: bool,
    /// Who decided.
    pub by: String,
    /// Why (ticket, provider answer).
    pub reason: String,
}

/// Why a resolution was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No record for that refund.
    #[error("no refund {0} in the store")]
    NotFound(String),
    /// Only in-doubt refunds can be resolved.
    #[error("refund {refund_id} is {state}, not in doubt: nothing to resolve")]
    NotInDoubt {
        /// The refund.
        refund_id: String,
        /// Its state.
        state: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recorded, but the event could not be published yet.
    #[error("resolution recorded, but the succeeded event was not published ({0}); replaying the refund's dead-lettered message publishes it")]
    Publish(String),
}

impl Worker {
    /// Settles an in-doubt refund. `executed` records and publishes the
    /// final `succeeded` event; `not_executed` makes the refund eligible for
    /// one new attempt, which a replay of its dead-lettered message starts.
    /// Both are noted in the refund's history with who and why.
    pub async fn resolve(
        &self,
        refund_id: &str,
        resolution: Resolution,
    ) -> Result<RefundRecord, ResolveError> {
        if resolution.by.trim().is_empty() || resolution.reason.trim().is_empty() {
            return Err(ResolveError::Invalid(
                "who (by) and why (reason) are required".into(),
            ));
        }
        let executed = match (&resolution.executed, resolution.not_executed) {
            (Some(txn), false) if !txn.trim().is_empty() => Some(txn.trim().to_string()),
            (None, true) => None,
            _ => {
                return Err(ResolveError::Invalid(
                    "give exactly one of: executed <provider transaction id>, not_executed".into(),
                ))
            }
        };
        let _guard = self.locks.lock(refund_id).await;
        let mut record = self
            .store
            .get(refund_id)?
            .ok_or_else(|| ResolveError::NotFound(refund_id.to_string()))?;
        if !matches!(record.state, RefundState::InDoubt { .. }) {
            return Err(ResolveError::NotInDoubt {
                refund_id: refund_id.to_string(),
                state: record_status(&record).to_string(),
            });
        }
        let who = format!("by {}: {}", resolution.by.trim(), resolution.reason.trim());
        match executed {
            Some(txn) => {
                let mut event = OutcomeEvent::new(
                    refund_id,
                    Status::Succeeded,
                    &record.command.echo(),
                    record.attempts,
                );
                event.performed = Some(record.command.operation);
                event.provider_transaction_id = Some(txn.clone());
                event.provider_message = Some(format!("resolved as executed {who}"));
                record.transition(
                    RefundState::Finished {
                        event: event.clone(),
                    },
                    format!("resolved as executed (provider transaction {txn}) {who}"),
                );
                self.store.put(&record)?;
                self.store
                    .settle(&record.command, Some(Reservation::Succeeded))?;
                self.store.sync().await?;
                metrics::outcome(&record.command.provider, "succeeded");
                warn!(refund_id, provider_transaction_id = txn.as_str(), %who, "in-doubt refund resolved as executed");
                self.publish_outside_delivery(&event)
                    .await
                    .map_err(ResolveError::Publish)?;
            }
            None => {
                let note = format!("resolved as not executed {who}; one new attempt allowed");
                record.transition(
                    RefundState::NotSent {
                        reason: note.clone(),
                    },
                    note.clone(),
                );
                self.store.put(&record)?;
                self.store
                    .settle(&record.command, Some(Reservation::InFlight))?;
                self.store.sync().await?;
                warn!(refund_id, %who, "in-doubt refund resolved as not executed; replay it to retry");
            }
        }
        Ok(record)
    }
}

/// The status an operator sees: the event status of a finished refund,
/// otherwise the lifecycle state (`attempting`, `not_sent`, `in_doubt`).
pub fn record_status(record: &RefundRecord) -> &'static str {
    match &record.state {
        RefundState::Finished { event } => event.status.as_str(),
        other => other.name(),
    }
}
