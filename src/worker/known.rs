//! Stage 2, claim, for a refund with a record of the same command: the
//! record decides, whatever today's configuration says.
//!
//! * `Finished`, `Pending`, `InDoubt`: the recorded event is published again
//!   (an in-doubt message is parked in the dead-letter queue for a person).
//! * `NotSent`: a new attempt, carrying what the record says it must (a
//!   repeat of an earlier request that may have been executed, or none).
//! * `Attempting`: a previous process (or a replica whose lease expired)
//!   was cut off mid-call, so the outcome is unknown: the request is
//!   repeated only when the record says the cut-off one carried a
//!   deduplication id this account honours, otherwise the refund is in
//!   doubt. A refund another live replica is attempting right now is left
//!   to it.

use super::claim::Claimed;
use super::park::Unsent;
use super::{PipelineError, Worker};
use crate::broker::publisher::{DeadLetter, ParkTarget, Publisher};
use crate::broker::topology::delay_queues;
use crate::contract::event::{now_rfc3339, OutcomeEvent};
use crate::store::{RefundRecord, RefundState};
use lapin::message::Delivery;
use std::time::Duration;
use tracing::{info, warn};

/// How long a copy waits in process for another replica's attempt before
/// it parks in a delay queue.
const WAIT_FOR_OWNER: Duration = Duration::from_secs(3);

impl Worker {
    /// A refund seen before, same command: its record decides.
    pub(super) async fn continue_known<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        existing: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        match existing.state.clone() {
            RefundState::Finished { event } => {
                self.duplicate_of_finished(publisher, delivery, &existing, &event)
                    .await?;
                Ok(None)
            }
            RefundState::Pending { event, .. } => {
                info!("duplicate of a pending refund: re-publishing `pending`, not executing");
                self.store.sync_refund(&existing.refund_id).await?;
                self.publish_recorded(publisher, &event).await?;
                Ok(None)
            }
            RefundState::InDoubt { event } => {
                warn!("refund is in doubt: not executing it again until an operator resolves it");
                self.store.sync_refund(&existing.refund_id).await?;
                self.publish_recorded(publisher, &event).await?;
                self.park_in_doubt(publisher, delivery, &event).await?;
                Ok(None)
            }
            RefundState::NotSent { .. } => self.retry_not_sent(publisher, delivery, existing).await,
            RefundState::Attempting { since } => {
                self.after_cut_off(publisher, delivery, existing, since)
                    .await
            }
        }
    }

    /// Re-publishes a finished refund's event. A redelivery of a message
    /// whose event the broker already confirmed (no outbox mark left) is
    /// only acked: its outcome went out once.
    async fn duplicate_of_finished(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        record: &RefundRecord,
        event: &OutcomeEvent,
    ) -> Result<(), PipelineError> {
        // A record written by a version before every outcome had its mark
        // (no attempt trace) may have had its message as the only carrier.
        let marked_always = record.attempt.is_some();
        if delivery.redelivered
            && marked_always
            && self.store.outbox_mark(&record.refund_id).await?.is_none()
        {
            info!(
                status = event.status.as_str(),
                "redelivered after its outcome was published and confirmed: acking it"
            );
            return Ok(());
        }
        info!(
            status = event.status.as_str(),
            "duplicate: re-publishing the recorded outcome"
        );
        self.store.sync_refund(&record.refund_id).await?;
        self.publish_recorded(publisher, event).await
    }

    /// A refund whose last attempt was not sent: a new attempt, if the
    /// account is still there and may send what the record requires.
    async fn retry_not_sent<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        mut record: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let Some(provider) = self.providers.get(&record.command.provider) else {
            self.park_account_gone(publisher, delivery, &record).await?;
            return Ok(None);
        };
        let trace = match Self::next_trace(&record, provider) {
            Ok(trace) => trace,
            Err(reason) => {
                self.in_doubt(publisher, delivery, record, reason).await?;
                return Ok(None);
            }
        };
        let refund = Unsent {
            refund_id: &record.refund_id,
            provider: &record.command.provider,
            attempts: record.attempts,
        };
        let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
            return Ok(None);
        };
        self.begin_attempt(&mut record, trace).await?;
        Ok(Some((provider, record, admitted)))
    }

    /// Nothing was sent; the account is gone from the configuration. Not a
    /// rejection (the refund is valid and may have been announced): it
    /// waits in the dead-letter queue for the fix.
    async fn park_account_gone(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        record: &RefundRecord,
    ) -> Result<(), PipelineError> {
        let reason = format!(
            "provider account {:?} is no longer configured; nothing was sent. \
             Restore the account, then replay",
            record.command.provider
        );
        warn!(%reason, "cannot attempt a refund of a removed account");
        let now = now_rfc3339();
        let info = DeadLetter {
            kind: "provider_misconfigured".into(),
            error: reason,
            attempts: record.attempts,
            first_failure_at: now.clone(),
            last_failure_at: now,
            refund_id: Some(record.refund_id.clone()),
            provider: Some(record.command.provider.clone()),
            delayed_rounds: None,
            throttled: None,
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    /// An `Attempting` record found under the lock: another live replica's
    /// attempt (left to it), or one that was cut off (repeated when the
    /// record says that is safe, else in doubt).
    async fn after_cut_off<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        mut record: RefundRecord,
        since: String,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        if self.store.attempt_in_progress(&record).await? {
            return Box::pin(self.wait_for_owner(publisher, delivery, record)).await;
        }
        let reason = format!(
            "a worker stopped during attempt {} (started {since}); \
             the provider may have executed it",
            record.attempts
        );
        record.note_uncertain();
        let next = match self.providers.get(&record.command.provider) {
            None => Err(format!(
                "{reason}; account {:?} is no longer configured",
                record.command.provider
            )),
            Some(provider) => Self::next_trace(&record, provider)
                .map(|trace| (provider, trace))
                .map_err(|why| format!("{reason}; {why}")),
        };
        let (provider, trace) = match next {
            Ok(next) => next,
            Err(reason) => {
                self.in_doubt(publisher, delivery, record, reason).await?;
                return Ok(None);
            }
        };
        let refund = Unsent {
            refund_id: &record.refund_id,
            provider: &record.command.provider,
            attempts: record.attempts,
        };
        let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
            return Ok(None);
        };
        warn!(%reason, "repeating the request: it carried a deduplication id the provider honours");
        self.begin_attempt(&mut record, trace).await?;
        Ok(Some((provider, record, admitted)))
    }

    /// Another live replica is attempting this refund: this copy never
    /// reaches the provider. It waits a little for that attempt's outcome
    /// (then answers from the record), else waits in a delay queue and
    /// comes back (the owner finishes, or its lease expires and the refund
    /// is settled from its record).
    async fn wait_for_owner<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        record: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OWNER;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Some(now) = self.store.get(&record.refund_id).await? else {
                continue;
            };
            let still = matches!(now.state, RefundState::Attempting { .. })
                && self.store.attempt_in_progress(&now).await?;
            if !still {
                return self.continue_known(publisher, delivery, now).await;
            }
        }
        let now = now_rfc3339();
        let info = DeadLetter {
            kind: "in_progress_elsewhere".into(),
            error: "another replica is attempting this refund; this copy waits for its outcome"
                .into(),
            attempts: record.attempts,
            first_failure_at: now.clone(),
            last_failure_at: now,
            refund_id: Some(record.refund_id.clone()),
            provider: Some(record.command.provider.clone()),
            delayed_rounds: None,
            throttled: None,
        };
        info!("another replica is attempting this refund: waiting in a delay queue");
        match delay_queues(&self.settings).first() {
            Some(queue) => {
                self.park(publisher, delivery, ParkTarget::DelayQueue(queue), &info)
                    .await?
            }
            None => return Err(PipelineError::Busy),
        }
        Ok(None)
    }
}
