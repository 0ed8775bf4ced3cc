//! Stage 2, claim: under the per-refund lock, the stored record decides
//! what this delivery is. A refund never seen is checked against today's
//! configuration (known account, provider rules), reserves its amount in
//! the over-refund ledger and is claimed (`Attempting`, synced) before any
//! provider call. A refund seen before takes the path its record names.

use super::{PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::command::RefundCommand;
use crate::providers::Provider;
use crate::store::{RefundRecord, RefundState, StoreError};
use lapin::message::Delivery;
use tracing::{debug, info, warn};

impl Worker {
    /// The provider and the record to attempt, or `None` when the delivery
    /// was settled here (rejected, duplicate re-published, in doubt parked).
    /// The caller holds the refund's lock.
    pub(super) async fn claim<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<(&'p Provider, RefundRecord)>, PipelineError> {
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
        if let Some(original) = command.original_amount {
            if self.store.get(&command.refund_id)?.is_none() {
                if let Err(over) = self.store.reserve(command, original)? {
                    let message = format!(
                        "refunding {} would exceed original_amount {}: {} already refunded or in flight",
                        over.requested, over.original_amount, over.reserved
                    );
                    self.reject_command(publisher, command, "over_refund", message)
                        .await?;
                    return Ok(None);
                }
            }
        }
        let fresh = RefundRecord::attempting(command);
        let Some(existing) = self.store.claim(&fresh)? else {
            self.store.sync().await?;
            debug!("claimed");
            return Ok(Some((provider, fresh)));
        };
        if existing.payload_hash != fresh.payload_hash {
            let message = format!(
                "refund_id {} was already used for a different command (first seen {}); \
                 the original refund is not affected",
                command.refund_id, existing.created_at
            );
            self.reject_command(publisher, command, "conflicting_payload", message)
                .await?;
            return Ok(None);
        }
        match existing.state.clone() {
            RefundState::Finished { event } => {
                info!(
                    status = event.status.as_str(),
                    "duplicate: re-publishing the recorded outcome"
                );
                self.publish_recorded(publisher, &event).await?;
                Ok(None)
            }
            RefundState::Pending { event, .. } => {
                info!("duplicate of a pending refund: re-publishing `pending`, not executing");
                self.publish_recorded(publisher, &event).await?;
                Ok(None)
            }
            RefundState::InDoubt { event } => {
                warn!("refund is in doubt: not executing it again until an operator resolves it");
                self.publish_recorded(publisher, &event).await?;
                self.park_in_doubt(publisher, delivery, &event).await?;
                Ok(None)
            }
            RefundState::NotSent { .. } => {
                let mut record = existing;
                self.begin_attempt(&mut record).await?;
                Ok(Some((provider, record)))
            }
            RefundState::Attempting { since } => {
                // We hold the lock, so no task of this process is
                // attempting it: a previous process died mid-call.
                let mut record = existing;
                let reason = format!(
                    "a previous worker process stopped during attempt {} (started {since}); \
                     the provider may have executed it",
                    record.attempts
                );
                if provider.repeats_are_safe() {
                    warn!(%reason, "repeating the request: the provider deduplicates it");
                    self.begin_attempt(&mut record).await?;
                    Ok(Some((provider, record)))
                } else {
                    self.in_doubt(publisher, delivery, record, reason).await?;
                    Ok(None)
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
                since: crate::event::now_rfc3339(),
            },
            note,
        );
        self.store.put(record)?;
        self.store.sync().await
    }
}
