//! Operator decisions over stored refunds, through the worker's HTTP API:
//! settling a refund that may have been paid after checking with the
//! provider (`resolve`, here), abandoning a refund that will not be sent
//! and releasing a reservation that nothing will ever settle
//! (`abandon.rs`). Every decision needs who and why; it is noted in the
//! refund's history and logged. A decision that cannot be applied safely
//! says why and changes nothing.

use super::Worker;
use crate::contract::command::Operation;
use crate::contract::event::{OutcomeEvent, Status};
use crate::observability::metrics;
use crate::store::ledger::{LedgerChange, Reservation};
use crate::store::{RefundRecord, RefundState, StoreError};
use tracing::warn;

/// How an operator settled an in-doubt refund after checking with the
/// provider. Exactly one of `executed` and `not_executed`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resolution {
    /// The provider executed it: its transaction id.
    #[serde(default)]
    pub executed: Option<String>,
    /// What the provider performed, when it may have performed something
    /// else than asked (a CreditGuard refund of a transaction not yet
    /// transmitted is performed as a cancel). Required then.
    #[serde(default)]
    pub performed: Option<Operation>,
    /// The provider did not execute it: allow one new attempt (via replay).
    #[serde(default)]
    pub not_executed: bool,
    /// Who decided.
    pub by: String,
    /// Why (ticket, provider answer).
    pub reason: String,
}

/// Who and why, for decisions that need nothing else.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// Who decided.
    pub by: String,
    /// Why (ticket, conversation).
    pub reason: String,
}

/// Why an operator decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No record for that refund.
    #[error("no refund {0} in the store")]
    NotFound(String),
    /// The refund is not in a state this decision applies to.
    #[error("refund {refund_id} is {state}: {why}")]
    WrongState {
        /// The refund.
        refund_id: String,
        /// Its state.
        state: String,
        /// What to do instead.
        why: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recorded, but the event could not be published yet.
    #[error("decision recorded, but its event was not published yet ({0}); the outbox publishes it when the broker is back")]
    Publish(String),
}

pub(super) fn who(by: &str, reason: &str) -> Result<String, ResolveError> {
    if by.trim().is_empty() || reason.trim().is_empty() {
        return Err(ResolveError::Invalid(
            "who (by) and why (reason) are required".into(),
        ));
    }
    Ok(format!("by {}: {}", by.trim(), reason.trim()))
}

pub(super) fn wrong_state(record: &RefundRecord, why: &str) -> ResolveError {
    ResolveError::WrongState {
        refund_id: record.refund_id.clone(),
        state: record.status().to_string(),
        why: why.to_string(),
    }
}

impl Worker {
    /// Settles a refund that may have been paid unseen (in doubt, or not
    /// sent after an attempt whose outcome is unknown). `executed` records
    /// and publishes the final `succeeded` event; `not_executed` makes the
    /// refund eligible for one new attempt, which a replay of its
    /// dead-lettered message starts.
    pub async fn resolve(
        &self,
        refund_id: &str,
        resolution: Resolution,
    ) -> Result<RefundRecord, ResolveError> {
        let who = who(&resolution.by, &resolution.reason)?;
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
            .get(refund_id)
            .await?
            .ok_or_else(|| ResolveError::NotFound(refund_id.to_string()))?;
        if !record.may_have_been_paid_unseen() {
            return Err(wrong_state(
                &record,
                "only a refund that may have been paid unseen (in doubt, or not sent after an \
                 attempt whose outcome is unknown) is resolved",
            ));
        }
        // The operator checked with the provider: no attempt is in doubt
        // any more.
        record.uncertain.clear();
        match executed {
            None => self.resolve_not_executed(record, &who).await,
            Some(txn) => {
                let performed = self.performed(&record, resolution.performed)?;
                self.resolve_executed(record, txn, performed, &who).await
            }
        }
    }

    /// Not executed: the refund may be attempted once more (a replay of its
    /// dead-lettered message starts it); its reservation stands for it.
    async fn resolve_not_executed(
        &self,
        mut record: RefundRecord,
        who: &str,
    ) -> Result<RefundRecord, ResolveError> {
        let note = format!("resolved as not executed {who}; one new attempt allowed");
        record.transition(
            RefundState::NotSent {
                reason: note.clone(),
            },
            note,
        );
        self.store
            .commit(&mut record, LedgerChange::Mark(Reservation::InFlight))
            .await?;
        self.store.sync_refund(&record.refund_id).await?;
        warn!(refund_id = record.refund_id.as_str(), %who, "in-doubt refund resolved as not executed; replay it to retry");
        Ok(record)
    }

    /// What the provider performed, as the operator says: an account that
    /// may perform a refund as a cancel must be told which.
    fn performed(
        &self,
        record: &RefundRecord,
        said: Option<Operation>,
    ) -> Result<Operation, ResolveError> {
        let asked = record.command.operation;
        let may_differ = self
            .providers
            .get(&record.command.provider)
            .is_none_or(|p| p.may_perform_otherwise(asked));
        match (said, may_differ) {
            (Some(performed), _) => Ok(performed),
            (None, false) => Ok(asked),
            (None, true) => Err(ResolveError::Invalid(format!(
                "this provider account may have performed the {} as another operation: \
                 say which with performed = refund | cancel (the provider's console tells)",
                asked.as_str()
            ))),
        }
    }

    /// Executed: the final `succeeded` event, recorded with the reservation
    /// kept as paid, then published.
    async fn resolve_executed(
        &self,
        mut record: RefundRecord,
        txn: String,
        performed: Operation,
        who: &str,
    ) -> Result<RefundRecord, ResolveError> {
        let mut event = OutcomeEvent::new(
            &record.refund_id,
            Status::Succeeded,
            &record.command.echo(),
            record.attempts,
        );
        event.performed = Some(performed);
        event.provider_transaction_id = Some(txn.clone());
        record.transition(
            RefundState::Finished {
                event: event.clone(),
            },
            format!(
                "resolved as executed ({} performed, provider transaction {txn}) {who}",
                performed.as_str()
            ),
        );
        self.store
            .commit(&mut record, LedgerChange::Mark(Reservation::Succeeded))
            .await?;
        self.store.sync_refund(&record.refund_id).await?;
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            "succeeded",
        );
        warn!(refund_id = record.refund_id.as_str(), provider_transaction_id = txn.as_str(), %who, "in-doubt refund resolved as executed");
        self.publish_outside_delivery(&event)
            .await
            .map_err(ResolveError::Publish)?;
        Ok(record)
    }
}
