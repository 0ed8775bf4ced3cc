//! Refunds a replica left `Attempting` when its lease expired (killed,
//! frozen, cut off from the database): the provider may have executed the
//! request, and the replica will never say. Every replica looks for them
//! every few seconds and settles each from its record, as a redelivery
//! would: in doubt (its event published from the outbox), unless the
//! record says the cut-off request carried a deduplication id this account
//! honours, in which case the refund's message, when it comes back, repeats
//! the same request.

use super::Worker;
use crate::store::{RefundState, StoreError};
use tracing::{info, warn};

/// Cut-off refunds one pass looks at.
const BATCH: usize = 100;

impl Worker {
    /// One pass; returns how many refunds it recorded in doubt.
    pub async fn settle_cut_off(&self) -> Result<usize, StoreError> {
        let mut settled = 0;
        for refund_id in self.store.cut_off_attempts(BATCH).await? {
            match self.settle_one_cut_off(&refund_id).await {
                Ok(true) => settled += 1,
                Ok(false) => {}
                // Another replica or a redelivery got there first.
                Err(super::PipelineError::Store(StoreError::Fenced { .. })) => {}
                Err(e) => {
                    warn!(refund_id, error = %e, "a cut-off attempt could not be settled yet")
                }
            }
        }
        if settled > 0 {
            info!(
                settled,
                "refunds cut off with an expired lease recorded in doubt"
            );
        }
        Ok(settled)
    }

    async fn settle_one_cut_off(&self, refund_id: &str) -> Result<bool, super::PipelineError> {
        let _guard = self.locks.lock(refund_id).await;
        let Some(mut record) = self.store.get(refund_id).await? else {
            return Ok(false);
        };
        let RefundState::Attempting { since } = record.state.clone() else {
            return Ok(false);
        };
        if self.store.attempt_in_progress(&record).await? {
            return Ok(false);
        }
        record.note_uncertain();
        let repeatable = self
            .providers
            .get(&record.command.provider)
            .is_some_and(|p| Self::next_trace(&record, p).is_ok());
        if repeatable {
            return Ok(false);
        }
        let reason = format!(
            "the replica attempting it (attempt {}, started {since}) stopped renewing its \
             lease; the provider may have executed it",
            record.attempts
        );
        let event = self.record_in_doubt(&mut record, &reason).await?;
        if let Err(e) = self.publish_outside_delivery(&event).await {
            warn!(refund_id, error = %e, "in-doubt event not published yet; the outbox has it");
        }
        Ok(true)
    }
}
