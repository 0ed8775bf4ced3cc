//! The outbox: every recorded event the broker has not confirmed yet is
//! marked in the store, in the same write as the record (see `store/`). The
//! pipeline takes the mark off after the confirm; whatever is left (a crash
//! between the durable outcome and the confirm, a broker outage during an
//! operator's decision or a provider callback) is published again by this
//! sweep: at start for everything, then periodically for marks older than
//! the sweep interval. Re-publishing is safe: the same outcome carries the
//! same `event_id`, which consumers deduplicate.

use super::Worker;
use crate::metrics;
use crate::store::StoreError;
use std::time::Duration;
use tracing::{info, warn};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Events published again and confirmed.
    pub republished: usize,
    /// Marks dropped because the record no longer has an event to publish.
    pub stale: usize,
    /// Events the broker still did not confirm (left for the next sweep).
    pub failed: usize,
}

impl Worker {
    /// Publishes the events marked unconfirmed at least `min_age` ago.
    pub async fn sweep_outbox(&self, min_age: Duration) -> Result<SweepReport, StoreError> {
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || store.unconfirmed(min_age))
            .await
            .map_err(|e| StoreError::Sled(sled::Error::Io(std::io::Error::other(e))))??;
        let mut report = SweepReport::default();
        for entry in entries {
            if let Some(journal) = self.store.journal() {
                // Cluster mode: every replica holds every partition's
                // outbox; the owner publishes.
                if !journal.holds(journal.partition_of(&entry.refund_id)) {
                    continue;
                }
            }
            let _guard = self.locks.lock(&entry.refund_id).await;
            // The delivery that recorded the event may have published it
            // and taken the mark off while this sweep waited for the lock
            // (the first sweep takes marks of any age): then it is done.
            let mark = self.store.outbox_mark(&entry.refund_id)?;
            if mark.is_none_or(|mark| mark.event_id != entry.event_id) {
                continue;
            }
            let event = self
                .store
                .get(&entry.refund_id)?
                .and_then(|r| r.state.event().cloned());
            let Some(event) = event else {
                self.store
                    .mark_published(&entry.refund_id, &entry.event_id)?;
                report.stale += 1;
                continue;
            };
            // The mark was written with the record; make both durable
            // before the event goes out.
            self.store.sync_refund(&entry.refund_id).await?;
            match self.publish_outside_delivery(&event).await {
                Ok(()) => {
                    // A mark for an older event of the same refund is moot.
                    self.store
                        .mark_published(&entry.refund_id, &entry.event_id)?;
                    report.republished += 1;
                }
                Err(e) => {
                    warn!(refund_id = entry.refund_id.as_str(), error = %e, "outbox: event still not confirmed");
                    report.failed += 1;
                    // The broker is likely down: try the rest next time.
                    break;
                }
            }
        }
        if report.republished > 0 || report.stale > 0 {
            info!(
                republished = report.republished,
                stale = report.stale,
                failed = report.failed,
                "outbox swept"
            );
        }
        metrics::outbox_republished(report.republished);
        Ok(report)
    }
}
