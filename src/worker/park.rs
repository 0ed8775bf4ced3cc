//! Stage 5, park: a delivery that cannot be finished now leaves the
//! consumer without holding a slot. Not-sent refunds wait in a TTL delay
//! queue (one round per `retry.delayed_ms` entry) and then go to the
//! dead-letter queue; in-doubt refunds, misconfigured accounts and poison
//! messages go to the dead-letter queue at once, with headers saying why.
//! Each is published with a confirm before the delivery is acked.

use super::{header_str, header_u32, PipelineError, Worker};
use crate::broker::publisher::{DeadLetter, ParkTarget, Publisher};
use crate::broker::topology::delay_queues;
use crate::broker::{HEADER_DELAYED_ROUNDS, HEADER_FIRST_FAILURE, HEADER_THROTTLED};
use crate::contract::event::{now_rfc3339, OutcomeEvent, Status};
use crate::observability::metrics;
use crate::store::ledger::{LedgerChange, Reservation};
use crate::store::{RefundRecord, RefundState};
use lapin::message::Delivery;
use tracing::{error, warn};

/// How a refund's last in-process attempts failed to reach the provider.
#[derive(Debug)]
pub(super) struct NotSentSoFar {
    /// The last reason.
    pub(super) reason: String,
    /// RFC 3339.
    pub(super) first_failure_at: String,
    /// RFC 3339.
    pub(super) last_failure_at: String,
}

/// Who a parked refund is, when it may have no record yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unsent<'a> {
    pub(super) refund_id: &'a str,
    pub(super) provider: &'a str,
    pub(super) attempts: u32,
}

/// Parks for an account's share of the slots before a refund is dead-lettered
/// as `throttled` (a bound, so nothing cycles for ever).
const MAX_THROTTLED_PARKS: u32 = 1000;

impl Worker {
    /// The account already has its share of this worker's delivery slots
    /// waiting at its limits: this refund waits in the shortest delay queue
    /// instead (not a provider round: nothing failed), so other accounts'
    /// refunds keep their slots.
    pub(super) async fn park_throttled(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        refund: Unsent<'_>,
    ) -> Result<(), PipelineError> {
        let parks = header_u32(delivery, HEADER_THROTTLED)
            .unwrap_or(0)
            .saturating_add(1);
        let now = now_rfc3339();
        let mut info = DeadLetter {
            kind: "throttled".into(),
            error: format!(
                "provider account {} is at its limits with its share of the delivery slots waiting",
                refund.provider
            ),
            attempts: refund.attempts,
            first_failure_at: header_str(delivery, HEADER_FIRST_FAILURE)
                .unwrap_or_else(|| now.clone()),
            last_failure_at: now,
            refund_id: Some(refund.refund_id.to_string()),
            provider: Some(refund.provider.to_string()),
            delayed_rounds: None,
            throttled: Some(parks),
        };
        metrics::gate_parked(refund.provider, "share");
        let queues = delay_queues(&self.settings);
        match queues.first() {
            Some(queue) if parks <= MAX_THROTTLED_PARKS => {
                self.park(publisher, delivery, ParkTarget::DelayQueue(queue), &info)
                    .await
            }
            _ => {
                info.error = format!("{} ({parks} times); giving up", info.error);
                warn!(%info.error, "throttled too often; the message goes to the dead-letter queue");
                self.dead_letter(publisher, delivery, &info).await
            }
        }
    }

    /// Out of in-process retries: the next delay queue, or the dead-letter
    /// queue after the last round. The record (`NotSent`) is synced first.
    pub(super) async fn park_not_sent(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        record: &RefundRecord,
        so_far: NotSentSoFar,
    ) -> Result<(), PipelineError> {
        let refund = Unsent {
            refund_id: &record.refund_id,
            provider: &record.command.provider,
            attempts: record.attempts,
        };
        self.park_unsent(publisher, delivery, refund, so_far).await
    }

    /// As [`Worker::park_not_sent`] for a refund that may have no record
    /// yet (its account's breaker is open): a delay-queue round, or the
    /// dead-letter queue after the last one.
    pub(super) async fn park_unsent(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        refund: Unsent<'_>,
        so_far: NotSentSoFar,
    ) -> Result<(), PipelineError> {
        self.store.sync_refund(refund.refund_id).await?;
        let rounds = header_u32(delivery, HEADER_DELAYED_ROUNDS).unwrap_or(0);
        let mut info = DeadLetter {
            kind: "provider_unavailable".into(),
            error: format!(
                "provider unavailable after {} attempts: {}",
                refund.attempts, so_far.reason
            ),
            attempts: refund.attempts,
            first_failure_at: so_far.first_failure_at,
            last_failure_at: so_far.last_failure_at,
            refund_id: Some(refund.refund_id.to_string()),
            provider: Some(refund.provider.to_string()),
            delayed_rounds: Some(rounds),
            throttled: None,
        };
        let queues = delay_queues(&self.settings);
        match queues.get(rounds as usize) {
            Some(queue) => {
                warn!(%info.error, queue = queue.as_str(), "not sent; waiting in a delay queue");
                info.delayed_rounds = Some(rounds + 1);
                metrics::retry("delayed");
                self.park(publisher, delivery, ParkTarget::DelayQueue(queue), &info)
                    .await
            }
            None => {
                warn!(%info.error, "giving up; the message goes to the dead-letter queue");
                self.dead_letter(publisher, delivery, &info).await
            }
        }
    }

    /// The account's configuration is wrong (credentials, terminal): nothing
    /// was executed, so the refund is `NotSent` and dead-lettered; a replay
    /// after the fix executes it.
    pub(super) async fn park_misconfigured(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        record: &mut RefundRecord,
        reason: String,
        first_failure: Option<String>,
    ) -> Result<(), PipelineError> {
        error!(%reason, "fix the provider account configuration, then replay from the dead-letter queue");
        record.transition(
            RefundState::NotSent {
                reason: reason.clone(),
            },
            reason.clone(),
        );
        self.write_after_call(record, LedgerChange::Keep).await?;
        self.store.sync_refund(&record.refund_id).await?;
        let now = now_rfc3339();
        let info = DeadLetter {
            kind: "provider_misconfigured".into(),
            error: reason,
            attempts: record.attempts,
            first_failure_at: first_failure.unwrap_or_else(|| now.clone()),
            last_failure_at: now,
            refund_id: Some(record.refund_id.clone()),
            provider: Some(record.command.provider.clone()),
            delayed_rounds: None,
            throttled: None,
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    /// The outcome may or may not have happened: record it as in doubt,
    /// tell accounting once, park the message for an operator.
    pub(super) async fn in_doubt(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        mut record: RefundRecord,
        reason: String,
    ) -> Result<(), PipelineError> {
        let event = self.record_in_doubt(&mut record, &reason).await?;
        self.publish_recorded(publisher, &event).await?;
        self.park_in_doubt(publisher, delivery, &event).await
    }

    /// Records a refund in doubt (durably, with its reservation kept and
    /// its event marked in the outbox) and returns its event.
    pub(super) async fn record_in_doubt(
        &self,
        record: &mut RefundRecord,
        reason: &str,
    ) -> Result<OutcomeEvent, PipelineError> {
        error!(%reason, "outcome unknown: the refund is in doubt and will not be sent again");
        record.note_uncertain();
        record.in_doubt_episodes += 1;
        let event = OutcomeEvent::new(
            &record.refund_id,
            Status::InDoubt,
            &record.command.echo(),
            record.attempts,
        )
        .episode(record.in_doubt_episodes)
        .with_error("outcome_unknown", reason.to_string());
        record.transition(
            RefundState::InDoubt {
                event: event.clone(),
            },
            format!("in doubt: {reason}"),
        );
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            "in_doubt",
        );
        self.write_after_call(record, LedgerChange::Mark(Reservation::InDoubt))
            .await?;
        self.store.sync_refund(&record.refund_id).await?;
        Ok(event)
    }

    /// Moves an in-doubt refund's message to the dead-letter queue, where a
    /// replay skips it until an operator resolved it.
    pub(super) async fn park_in_doubt(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        event: &OutcomeEvent,
    ) -> Result<(), PipelineError> {
        let now = now_rfc3339();
        let info = DeadLetter {
            kind: "in_doubt".into(),
            error: event
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "outcome unknown".into()),
            attempts: event.attempts,
            first_failure_at: header_str(delivery, HEADER_FIRST_FAILURE)
                .unwrap_or_else(|| event.occurred_at.clone()),
            last_failure_at: now,
            refund_id: Some(event.refund_id.clone()),
            provider: event.provider.clone(),
            delayed_rounds: None,
            throttled: None,
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    /// Dead-letters a message that cannot be tied to a refund.
    pub(super) async fn poison(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        kind: &str,
        message: String,
        refund_id: Option<String>,
    ) -> Result<(), PipelineError> {
        warn!(kind, %message, "poison message: moving it to the dead-letter queue");
        let now = now_rfc3339();
        let info = DeadLetter {
            kind: kind.into(),
            error: message,
            attempts: 0,
            first_failure_at: now.clone(),
            last_failure_at: now,
            refund_id,
            provider: None,
            delayed_rounds: None,
            throttled: None,
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    pub(super) async fn dead_letter(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        info: &DeadLetter,
    ) -> Result<(), PipelineError> {
        self.park(publisher, delivery, ParkTarget::DeadLetters, info)
            .await
    }

    pub(super) async fn park(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        target: ParkTarget<'_>,
        info: &DeadLetter,
    ) -> Result<(), PipelineError> {
        // A replay goes to the commands exchange whatever a header says (a
        // producer could name any exchange there); the routing key it was
        // first published with travels along.
        let exchange = self.settings.amqp.commands_exchange.clone();
        let routing_key = header_str(delivery, crate::broker::HEADER_ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.to_string());
        // A dead letter is read by people and tools: a payout's card token
        // leaves with its last four digits only (its record keeps it whole).
        // A delay queue's copy comes back to be sent, so it keeps it.
        let body = match target {
            ParkTarget::DeadLetters => {
                metrics::dead_lettered(&info.kind);
                crate::contract::command::mask_card_tokens(&delivery.data)
            }
            _ => std::borrow::Cow::Borrowed(delivery.data.as_slice()),
        };
        publisher
            .park(
                target,
                &body,
                &delivery.properties,
                &exchange,
                &routing_key,
                info,
            )
            .await?;
        Ok(())
    }
}
