//! Stage 2, claim: under the per-refund lock, the store decides first what
//! this delivery is. A refund seen before (a record, or the tombstone of a
//! pruned one) takes the path its record names whatever today's
//! configuration says, so a renamed account or a changed rule never turns a
//! decided refund into `rejected`. Only a refund never seen is checked
//! against today's configuration (known account, provider rules), and is
//! then claimed (`Attempting`, with its over-refund reservation, in one
//! write, synced) before any provider call.

use super::admit::Admitted;
use super::park::Unsent;
use super::{PipelineError, Worker};
use crate::broker::publisher::{DeadLetter, Publisher};
use crate::command::RefundCommand;
use crate::event::now_rfc3339;
use crate::providers::Provider;
use crate::store::{Claim, Known, RefundRecord, RefundState, StoreError};
use lapin::message::Delivery;
use tracing::{debug, info, warn};

/// What the attempt stage needs: the provider, the record (`Attempting`,
/// durable) and the pass through the account's gate.
pub(super) type Claimed<'p> = (&'p Provider, RefundRecord, Admitted);

impl Worker {
    /// The provider and the record to attempt, or `None` when the delivery
    /// was settled here (rejected, duplicate re-published, in doubt parked).
    /// The caller holds the refund's lock.
    pub(super) async fn claim<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        match self.store.lookup(&command.refund_id).await? {
            None => self.claim_new(publisher, delivery, command).await,
            Some(Known::Tombstone(tombstone)) => {
                if tombstone.payload_hash != command.payload_hash() {
                    let message = format!(
                        "refund_id {} was already used for a different command (finished {}); \
                         the original refund is not affected",
                        command.refund_id, tombstone.occurred_at
                    );
                    self.reject_command(publisher, command, "conflicting_payload", message)
                        .await?;
                    return Ok(None);
                }
                info!(
                    status = tombstone.status.as_str(),
                    "duplicate of a pruned refund: re-publishing its recorded outcome"
                );
                let event = tombstone.event(command);
                publisher.publish_event(&event).await?;
                Ok(None)
            }
            Some(Known::Record(existing)) => {
                self.on_record(publisher, delivery, command, *existing)
                    .await
            }
        }
    }

    /// A refund with a record: the same command continues from it; another
    /// command re-using the id is rejected and changes nothing.
    async fn on_record<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
        existing: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        if existing.payload_hash != command.payload_hash() {
            let message = format!(
                "refund_id {} was already used for a different command (first seen {}); \
                 the original refund is not affected",
                command.refund_id, existing.created_at
            );
            self.reject_command(publisher, command, "conflicting_payload", message)
                .await?;
            return Ok(None);
        }
        self.continue_known(publisher, delivery, existing).await
    }

    /// A refund never seen: today's configuration decides whether it is
    /// valid; then the record and the reservation are written together.
    async fn claim_new<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let Some(provider) = self.providers.get(&command.provider) else {
            let message = format!(
                "provider {:?} is not a configured account (configured: {})",
                command.provider,
                self.providers.names().join(", ")
            );
            self.reject_command(publisher, command, "unknown_provider", message)
                .await?;
            return Ok(None);
        };
        if let Err(message) = provider.check(command) {
            self.reject_command(publisher, command, "invalid_command", message)
                .await?;
            return Ok(None);
        }
        let refund = Unsent {
            refund_id: &command.refund_id,
            provider: &command.provider,
            attempts: 0,
        };
        let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
            return Ok(None);
        };
        let mut fresh = RefundRecord::attempting(command);
        match self.store.claim(&mut fresh).await? {
            Claim::Claimed => {
                self.sync_before_call(&mut fresh).await?;
                debug!("claimed");
                Ok(Some((provider, fresh, admitted)))
            }
            Claim::OverRefund(over) => {
                let message = format!(
                    "refunding {} would exceed original_amount {}: {} already refunded or in flight",
                    over.requested, over.original_amount, over.reserved
                );
                self.reject_command(publisher, command, "over_refund", message)
                    .await?;
                Ok(None)
            }
            // We hold the lock and looked just now: another replica
            // claimed it meanwhile. Its record decides.
            Claim::Exists(existing) => {
                Box::pin(self.on_record(publisher, delivery, command, *existing)).await
            }
        }
    }

    /// A refund seen before, same command: its record decides.
    async fn continue_known<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        existing: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let refund = Unsent {
            refund_id: &existing.refund_id,
            provider: &existing.command.provider,
            attempts: existing.attempts,
        };
        match existing.state.clone() {
            RefundState::Finished { event } => {
                info!(
                    status = event.status.as_str(),
                    "duplicate: re-publishing the recorded outcome"
                );
                self.store.sync_refund(&existing.refund_id).await?;
                self.publish_recorded(publisher, &event).await?;
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
            RefundState::NotSent { .. } => {
                let Some(provider) = self.providers.get(&existing.command.provider) else {
                    // Nothing was sent; the account is gone from the
                    // configuration. Not a rejection (the refund is valid
                    // and may have been announced): it waits for the fix.
                    let reason = format!(
                        "provider account {:?} is no longer configured; nothing was sent. \
                         Restore the account, then replay",
                        existing.command.provider
                    );
                    warn!(%reason, "cannot attempt a refund of a removed account");
                    let now = now_rfc3339();
                    let info = DeadLetter {
                        kind: "provider_misconfigured".into(),
                        error: reason,
                        attempts: existing.attempts,
                        first_failure_at: now.clone(),
                        last_failure_at: now,
                        refund_id: Some(existing.refund_id.clone()),
                        provider: Some(existing.command.provider.clone()),
                        delayed_rounds: None,
                        throttled: None,
                    };
                    self.dead_letter(publisher, delivery, &info).await?;
                    return Ok(None);
                };
                let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
                    return Ok(None);
                };
                let mut record = existing.clone();
                self.begin_attempt(&mut record).await?;
                Ok(Some((provider, record, admitted)))
            }
            RefundState::Attempting { since } => {
                // We hold the lock, so no task of this process is
                // attempting it: a previous process died mid-call.
                let mut record = existing.clone();
                let reason = format!(
                    "a previous worker process stopped during attempt {} (started {since}); \
                     the provider may have executed it",
                    record.attempts
                );
                match self.providers.get(&record.command.provider) {
                    Some(provider) if provider.repeats_are_safe() => {
                        let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
                            return Ok(None);
                        };
                        warn!(%reason, "repeating the request: the provider deduplicates it");
                        self.begin_attempt(&mut record).await?;
                        Ok(Some((provider, record, admitted)))
                    }
                    _ => {
                        self.in_doubt(publisher, delivery, record, reason).await?;
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Records a new attempt durably before the request leaves.
    pub(super) async fn begin_attempt(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        record.attempts += 1;
        let note = format!("attempt {} started", record.attempts);
        record.transition(
            RefundState::Attempting {
                since: now_rfc3339(),
            },
            note,
        );
        self.store.take_attempt(record).await?;
        self.sync_before_call(record).await
    }

    /// Makes `Attempting` durable. If that fails the request is not sent,
    /// and the record says so (`NotSent`), so that a later look at it does
    /// not take the failed sync for an attempt whose outcome is unknown.
    async fn sync_before_call(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        if let Err(e) = self.store.sync_refund(&record.refund_id).await {
            let reason = format!("the attempt could not be made durable ({e}); nothing was sent");
            record.transition(
                RefundState::NotSent {
                    reason: reason.clone(),
                },
                reason,
            );
            let _ = self.store.put(record).await;
            return Err(e);
        }
        Ok(())
    }
}
