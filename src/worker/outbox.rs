//! The outbox: every recorded event the broker has not confirmed yet is
//! marked in the store, in the same write as the record (see `store/`). The
//! pipeline takes the mark off after the confirm; whatever is left (a crash
//! between the durable outcome and the confirm, a broker outage during an
//! operator's decision or a provider callback) is published again by this
//! sweep: at start for everything, then periodically for marks older than
//! the sweep interval. Re-publishing is safe: the same outcome carries the
//! same `event_id`, which consumers deduplicate.

use super::Worker;
use crate::broker::publisher::Publisher;
use crate::observability::metrics;
use crate::store::{OutboxEntry, StoreError};
use std::time::Duration;
use tracing::{error, info, warn};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Events published again and confirmed.
    pub republished: usize,
    /// Marks dropped because the record no longer has an event to publish.
    pub stale: usize,
    /// Events the broker still did not confirm (left for the next sweep).
    pub failed: usize,
    /// Marks whose record could not be read (skipped; see the log).
    pub unreadable: usize,
}

/// Marks one sweep takes at most; the rest wait for the next sweep.
const SWEEP_BATCH: usize = 1000;

impl Worker {
    /// Publishes the events marked unconfirmed at least `min_age` ago. A
    /// record that cannot be read is counted, logged and skipped: it must
    /// not hold back the events of every other refund.
    pub async fn sweep_outbox(&self, min_age: Duration) -> Result<SweepReport, StoreError> {
        let entries = self.store.unconfirmed(min_age, SWEEP_BATCH).await?;
        let mut report = SweepReport::default();
        for entry in entries {
            match self.sweep_one(&entry).await {
                Ok(Swept::Republished) => report.republished += 1,
                Ok(Swept::Stale) => report.stale += 1,
                Ok(Swept::Done) => {}
                Ok(Swept::NotConfirmed(e)) => {
                    warn!(refund_id = entry.refund_id.as_str(), error = %e, "outbox: event still not confirmed");
                    report.failed += 1;
                    // The broker is likely down: try the rest next time.
                    break;
                }
                Err(StoreError::Corrupt { refund_id, source }) => {
                    error!(refund_id = refund_id.as_str(), error = %source, "outbox: the record is unreadable; its event cannot be published until it is repaired");
                    report.unreadable += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if report.republished > 0 || report.stale > 0 || report.unreadable > 0 {
            info!(
                republished = report.republished,
                stale = report.stale,
                failed = report.failed,
                unreadable = report.unreadable,
                "outbox swept"
            );
        }
        metrics::outbox_republished(report.republished);
        Ok(report)
    }

    /// Publishes the oldest unconfirmed event through `publisher` (a new
    /// session's, before it takes refunds): `Err` when it cannot be
    /// published, so that the session does not start paying refunds whose
    /// events cannot go out.
    pub async fn publish_oldest_unconfirmed(&self, publisher: &Publisher) -> Result<(), String> {
        let oldest = self
            .store
            .oldest_unconfirmed()
            .await
            .map_err(|e| e.to_string())?;
        let Some(entry) = oldest else {
            return Ok(());
        };
        let _guard = self.locks.lock(&entry.refund_id).await;
        let record = match self.store.get(&entry.refund_id).await {
            Ok(record) => record,
            // Unreadable: the sweep reports it; it says nothing about the
            // broker.
            Err(_) => return Ok(()),
        };
        let Some(event) = record.and_then(|r| r.state.event().cloned()) else {
            return Ok(());
        };
        self.store
            .sync_refund(&entry.refund_id)
            .await
            .map_err(|e| e.to_string())?;
        self.publish_recorded(publisher, &event)
            .await
            .map_err(|e| e.to_string())
    }

    async fn sweep_one(&self, entry: &OutboxEntry) -> Result<Swept, StoreError> {
        let _guard = self.locks.lock(&entry.refund_id).await;
        // The delivery that recorded the event may have published it and
        // taken the mark off while this sweep waited for the lock (the
        // first sweep takes marks of any age): then it is done.
        let mark = self.store.outbox_mark(&entry.refund_id).await?;
        if mark.is_none_or(|mark| mark.event_id != entry.event_id) {
            return Ok(Swept::Done);
        }
        let event = self
            .store
            .get(&entry.refund_id)
            .await?
            .and_then(|r| r.state.event().cloned());
        let Some(event) = event else {
            self.store
                .mark_published(&entry.refund_id, &entry.event_id)
                .await?;
            return Ok(Swept::Stale);
        };
        // The mark was written with the record; make both durable before
        // the event goes out.
        self.store.sync_refund(&entry.refund_id).await?;
        match self.publish_outside_delivery(&event).await {
            Ok(()) => {
                // A mark for an older event of the same refund is moot.
                self.store
                    .mark_published(&entry.refund_id, &entry.event_id)
                    .await?;
                Ok(Swept::Republished)
            }
            Err(e) => Ok(Swept::NotConfirmed(e)),
        }
    }
}

/// What the sweep did with one mark.
enum Swept {
    Republished,
    Stale,
    /// Published and confirmed by someone else meanwhile.
    Done,
    NotConfirmed(String),
}
