//! Stage 4, finish: the outcome is written (with its outbox mark) and
//! synced; the event is published with a confirm, and the delivery acked
//! after it. A failed confirm puts the delivery back, and the outbox sweep
//! publishes the event too (same `event_id`). The delivery's processing
//! slot is let go as soon as the outcome is written (`app.rs`: the
//! broker's window holds the refunds still finishing), so neither the
//! outcome's sync nor the wait for the confirm delays the next refund,
//! whose claim joins the same flush.
//!
//! An outcome the provider gave is never dropped: while the store cannot
//! be written (a database outage) the write is tried again until it lands,
//! and a write fenced by another replica's settlement (this replica's
//! lease expired mid-call) settles a refund left in doubt by that attempt
//! with the provider's answer.
//! Rejections are published without a record (they depend on the message
//! and on configuration, and a corrected command may re-use the id).

use super::{Inbound, PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::contract::command::{Echo, RefundCommand};
use crate::contract::event::{now_rfc3339, OutcomeEvent, Status};
use crate::observability::metrics;
use crate::store::ledger::{LedgerChange, Reservation};
use crate::store::{RefundRecord, RefundState};
use std::time::Instant;
use tracing::{info, warn};

impl Worker {
    /// Records a final outcome durably, then publishes it.
    pub(super) async fn finish(
        &self,
        publisher: &Publisher,
        inbound: Inbound<'_>,
        record: &mut RefundRecord,
        event: OutcomeEvent,
        started: Instant,
    ) -> Result<(), PipelineError> {
        let note = format!("outcome {}", event.status.as_str());
        record.transition(
            RefundState::Finished {
                event: event.clone(),
            },
            note,
        );
        let change = match event.status {
            Status::Succeeded => LedgerChange::Mark(Reservation::Succeeded),
            _ => LedgerChange::Release,
        };
        self.write_after_call(record, change).await?;
        // The provider call is over: the next delivery may start, and its
        // claim shares this outcome's flush (the group commit) instead of
        // waiting for it. The delivery stays unacked, and the broker's
        // window (`app.rs`) bounds the refunds still finishing.
        inbound.ack.release_slot();
        self.store.sync_refund(&record.refund_id).await?;
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            event.status.as_str(),
        );
        info!(
            provider = record.command.provider.as_str(),
            status = event.status.as_str(),
            attempts = event.attempts,
            latency_ms = started.elapsed().as_millis() as u64,
            "refund outcome"
        );
        self.publish_recorded(publisher, &event).await
    }

    /// The provider accepted the refund and will post its answer later
    /// (Paynet): record `Pending` durably, then publish `pending`.
    pub(super) async fn wait_for_callback(
        &self,
        publisher: &Publisher,
        record: &mut RefundRecord,
        event: OutcomeEvent,
    ) -> Result<(), PipelineError> {
        record.transition(
            RefundState::Pending {
                event: event.clone(),
                since: now_rfc3339(),
            },
            "accepted by the provider; waiting for its callback",
        );
        self.write_after_call(record, LedgerChange::Keep).await?;
        self.store.sync_refund(&record.refund_id).await?;
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            "pending",
        );
        info!(
            status = "pending",
            attempts = record.attempts,
            "refund outcome"
        );
        self.publish_recorded(publisher, &event).await
    }

    /// Publishes an event that is already durable in the record, then takes
    /// it off the outbox (not synced: losing that mark in a crash only means
    /// one more publication with the same `event_id`, which consumers
    /// deduplicate).
    pub(super) async fn publish_recorded(
        &self,
        publisher: &Publisher,
        event: &OutcomeEvent,
    ) -> Result<(), PipelineError> {
        publisher.publish_event(event).await?;
        self.store
            .mark_published(&event.refund_id, &event.event_id)
            .await?;
        Ok(())
    }

    /// Rejects a parsed command (see [`Worker::reject`]).
    pub(super) async fn reject_command(
        &self,
        publisher: &Publisher,
        command: &RefundCommand,
        kind: &str,
        message: String,
    ) -> Result<(), PipelineError> {
        self.reject(
            publisher,
            &command.refund_id,
            &command.echo(),
            kind,
            message,
        )
        .await
    }

    /// Publishes a `rejected` event. Not recorded: a rejection depends only
    /// on the message (and configuration), so a redelivery rejects it again
    /// with the same `event_id`, and a corrected command may re-use the id.
    pub(super) async fn reject(
        &self,
        publisher: &Publisher,
        refund_id: &str,
        echo: &Echo,
        kind: &str,
        message: String,
    ) -> Result<(), PipelineError> {
        warn!(kind, %message, "command rejected");
        let event =
            OutcomeEvent::new(refund_id, Status::Rejected, echo, 0).with_error(kind, message);
        info!(
            provider = echo.provider.as_deref().unwrap_or(""),
            status = "rejected",
            attempts = 0,
            "refund outcome"
        );
        metrics::outcome(
            self.providers.label(echo.provider.as_deref().unwrap_or("")),
            echo.operation,
            "rejected",
        );
        publisher.publish_event(&event).await?;
        Ok(())
    }

    /// Publishes a recorded event that does not answer a delivery (operator
    /// decisions, callbacks, the outbox sweep) and takes it off the outbox
    /// once confirmed. On failure it stays there for the next sweep.
    pub(super) async fn publish_outside_delivery(
        &self,
        event: &OutcomeEvent,
    ) -> Result<(), String> {
        self.publish_side(event).await?;
        self.store
            .mark_published(&event.refund_id, &event.event_id)
            .await
            .map_err(|e| e.to_string())
    }

    /// On the session's channel when there is one, else on a connection of
    /// its own.
    pub(super) async fn publish_side(&self, event: &OutcomeEvent) -> Result<(), String> {
        let current = self.side.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(publisher) = current {
            if publisher.publish_event(event).await.is_ok() {
                return Ok(());
            }
        }
        let connection = crate::broker::connect_with(&self.settings.amqp, "refund-worker-side")
            .await
            .map_err(|e| e.to_string())?;
        let result = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            let publisher = Publisher::new(channel, &self.settings.amqp)
                .await
                .map_err(|e| e.to_string())?;
            publisher
                .publish_event(event)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let _ = connection.close(200, "published".into()).await;
        result
    }
}
