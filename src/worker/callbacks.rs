//! Provider callbacks: Paynet posts the final answer of a refund it
//! accepted to the refund's `succeedUrl`. The callback is not signed, so it
//! must carry the refund's unguessable token; it moves the refund to its
//! final state once and never publishes a second, different final event.
//!
//! A verified callback is the provider's own answer, so it also settles a
//! refund whose request timed out or whose worker crashed mid-call
//! (`attempting`, `in_doubt`): exactly the doubt an operator would
//! otherwise have to resolve by hand.

use super::Worker;
use crate::contract::event::{OutcomeEvent, Status};
use crate::observability::metrics;
use crate::providers::paynet::wire::Callback;
use crate::store::ledger::{LedgerChange, Reservation};
use crate::store::{RefundRecord, RefundState, StoreError};
use crate::values::secret::constant_time_eq;
use tracing::{error, info, warn};

/// What a provider callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The pending refund got its final outcome (event published).
    Finalised(Status),
    /// A refund in doubt (or cut off mid-attempt, or recorded as not sent)
    /// was settled by the provider's answer (event published).
    Settled(Status),
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
        let Some(mut record) = self.store.get(refund_id).await? else {
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
        let settles = match &record.state {
            RefundState::Pending { .. } => None,
            RefundState::Attempting { .. } | RefundState::InDoubt { .. } => Some(false),
            RefundState::NotSent { .. } => Some(true),
            RefundState::Finished { event } => {
                let event = event.clone();
                return self.after_final(record, event, status, note).await;
            }
        };
        let event = callback_event(&record, &callback, status);
        let note = settled_note(&record, settles, note);
        self.record_callback(&mut record, &event, callback.approved, note)
            .await?;
        self.publish_outside_delivery(&event)
            .await
            .map_err(CallbackError::Publish)?;
        Ok(match settles {
            None => CallbackOutcome::Finalised(status),
            Some(_) => CallbackOutcome::Settled(status),
        })
    }

    /// Records the provider's final answer for a refund that had none:
    /// the record, its reservation (kept as paid, or released) and its
    /// outbox mark together, durably, before the event goes out.
    async fn record_callback(
        &self,
        record: &mut RefundRecord,
        event: &OutcomeEvent,
        approved: bool,
        note: String,
    ) -> Result<(), CallbackError> {
        // The provider's own answer: no attempt is in doubt any more.
        record.uncertain.clear();
        record.transition(
            RefundState::Finished {
                event: event.clone(),
            },
            note,
        );
        let change = if approved {
            LedgerChange::Mark(Reservation::Succeeded)
        } else {
            LedgerChange::Release
        };
        self.store.commit(record, change).await?;
        self.store.sync_refund(&record.refund_id).await?;
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            event.status.as_str(),
        );
        info!(
            refund_id = record.refund_id.as_str(),
            provider = record.command.provider.as_str(),
            status = event.status.as_str(),
            attempts = record.attempts,
            "refund outcome"
        );
        Ok(())
    }

    /// A callback for a refund already final: a repeat is noted and its
    /// event published again (503 if that fails, so the provider retries);
    /// a contradiction is recorded and alarmed, never published.
    async fn after_final(
        &self,
        mut record: crate::store::RefundRecord,
        event: OutcomeEvent,
        status: Status,
        note: String,
    ) -> Result<CallbackOutcome, CallbackError> {
        let refund_id = record.refund_id.clone();
        if event.status == status {
            record.transition(record.state.clone(), format!("repeated {note}"));
            self.store.annotate(&mut record).await?;
            self.store.sync_refund(&refund_id).await?;
            // Covers a first publication that failed; same event_id.
            self.publish_outside_delivery(&event)
                .await
                .map_err(CallbackError::Publish)?;
            return Ok(CallbackOutcome::Repeated);
        }
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
        if status == Status::Succeeded {
            // The provider says the money moved: whatever was recorded, its
            // amount counts against the original charge again, so that the
            // over-refund guard does not let it be refunded a second time.
            let unconfirmed = self.store.outbox_mark(&record.refund_id).await?.is_some();
            self.store
                .commit(&mut record, LedgerChange::Restore(Reservation::Succeeded))
                .await?;
            // The recorded event stands; its mark stays only if it was not
            // confirmed yet.
            if !unconfirmed {
                self.store
                    .mark_published(&record.refund_id, &event.event_id)
                    .await?;
            }
        } else {
            self.store.annotate(&mut record).await?;
        }
        self.store.sync_refund(&record.refund_id).await?;
        Ok(CallbackOutcome::Contradicted)
    }
}

/// The outcome event a callback brings.
fn callback_event(record: &RefundRecord, callback: &Callback, status: Status) -> OutcomeEvent {
    let mut event = OutcomeEvent::new(
        &record.refund_id,
        status,
        &record.command.echo(),
        record.attempts,
    );
    event.performed = callback.approved.then_some(record.command.operation);
    event.provider_transaction_id = Some(callback.xact_id.clone()).filter(|x| !x.is_empty());
    event.provider_code = Some(callback.code.clone());
    event.provider_message = Some(callback.message.clone());
    if !callback.approved {
        event = event.with_error(
            "declined",
            format!("provider disapproved: {}", callback.message),
        );
    }
    event
}

/// The history note of a callback that settles a refund, and its log line:
/// `settles` is `None` for a pending refund (the expected answer),
/// `Some(false)` for one being attempted or in doubt, `Some(true)` for one
/// recorded as not sent (a contradiction, alarmed).
fn settled_note(record: &RefundRecord, settles: Option<bool>, note: String) -> String {
    let refund_id = record.refund_id.as_str();
    let was = record.state.name();
    match settles {
        None => note,
        Some(false) => {
            info!(refund_id, was, "a provider callback settles the refund");
            format!("{was} settled by the provider's {note}")
        }
        Some(true) => {
            error!(refund_id, "provider callback for a refund recorded as not sent: recording the provider's answer; check that it was not sent twice");
            metrics::contradiction(&record.command.provider);
            format!(
                "the provider answered for a refund recorded as not sent \
                 (an operator's resolution or a lost answer); its answer is recorded: {note}"
            )
        }
    }
}
