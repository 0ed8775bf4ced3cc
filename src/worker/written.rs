//! Writing what a provider call produced. The call is over and its answer
//! (or the knowledge that its outcome is unknown) exists only in this
//! process until it is written, so:
//!
//! * while the store cannot be written (a database outage, the pool
//!   exhausted) the write is tried again, with a growing pause, until it
//!   lands; the delivery stays unacked meanwhile;
//! * when the write is fenced (the record changed since it was read: this
//!   replica's lease expired during the call and another replica recorded
//!   the refund in doubt), the provider's answer still settles that doubt
//!   when the doubt is about this very attempt: it is the provider's truth,
//!   like a callback's. Anything else a fenced replica would write does not
//!   land; its delivery goes back and the record answers the redelivery.

use super::{PipelineError, Worker};
use crate::store::ledger::LedgerChange;
use crate::store::{RefundRecord, RefundState, StoreError};
use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;
use tracing::{error, warn};

impl Worker {
    /// Writes `record` (its state after a provider call) with `change`,
    /// through outages, and through a fence when the provider's answer
    /// settles the doubt another replica recorded about this attempt.
    pub(super) async fn write_after_call(
        &self,
        record: &mut RefundRecord,
        change: LedgerChange,
    ) -> Result<(), PipelineError> {
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        loop {
            match self.store.commit(record, change).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable(e)) => {
                    let pause = pauses.next().unwrap_or(Duration::from_secs(5));
                    warn!(error = %e, pause_ms = pause.as_millis() as u64, "the outcome of a provider call could not be written yet; trying again");
                    tokio::time::sleep(pause).await;
                }
                Err(StoreError::Fenced { refund_id }) => {
                    return self.after_fence(record, change, refund_id).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The record changed during the call. The answer of this attempt
    /// settles the refund only when it is now in doubt about this attempt.
    async fn after_fence(
        &self,
        record: &mut RefundRecord,
        change: LedgerChange,
        refund_id: String,
    ) -> Result<(), PipelineError> {
        let current = self.store.get(&refund_id).await?;
        let Some(mut current) = current else {
            return Err(StoreError::Fenced { refund_id }.into());
        };
        let final_answer = matches!(record.state, RefundState::Finished { .. });
        let doubt_is_ours = matches!(current.state, RefundState::InDoubt { .. })
            && current.attempts == record.attempts;
        if !(final_answer && doubt_is_ours) {
            error!(refund_id, "another replica decided this refund during this replica's call (its lease expired): this call's result is not written; the record decides");
            return Err(StoreError::Fenced { refund_id }.into());
        }
        warn!(
            refund_id,
            attempt = record.attempts,
            "the late answer of the attempt another replica recorded in doubt settles it"
        );
        let state = record.state.clone();
        current.uncertain.clear();
        current.transition(
            state,
            format!(
                "settled by the provider's answer to attempt {}, which arrived after this \
                 replica's lease expired",
                record.attempts
            ),
        );
        self.store.commit(&mut current, change).await?;
        *record = current;
        Ok(())
    }
}
