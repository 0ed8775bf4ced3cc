//! Stage 2b, admission: between the claim stage's decision to call the
//! provider and the `Attempting` record, the refund passes its account's
//! gate (`providers/gate.rs`): an open circuit breaker sends it to a delay
//! queue without a call (a provider round, as if it had not been sent); a
//! limited account makes it wait here, holding no provider connection; and
//! when the account already has its share of this worker's delivery slots
//! waiting (`amqp.account_share` of the prefetch), it waits in a delay queue
//! instead, so the other accounts keep their slots.

use super::park::Unsent;
use super::{header_str, PipelineError, Worker};
use crate::broker::publisher::{DeadLetter, ParkTarget, Publisher};
use crate::broker::topology::delay_queues;
use crate::broker::HEADER_FIRST_FAILURE;
use crate::contract::event::now_rfc3339;
use crate::observability::metrics;
use crate::providers::gate::{Gate, Pass, Refusal};
use crate::providers::ProviderOutcome;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// How long an account is slowed down after a 429 without `Retry-After`.
const DEFAULT_SLOWDOWN: Duration = Duration::from_secs(5);

/// A refund that passed its account's gate; held for the whole attempt.
#[derive(Debug)]
pub(super) struct Admitted {
    gate: Arc<Gate>,
    pass: Pass,
}

impl Admitted {
    /// Tells the gate how a request ended (the breaker counts "not sent"
    /// and "unknown"; `Retry-After` and 429 slow the account down).
    pub(super) fn answered(&mut self, outcome: &ProviderOutcome) {
        let reached = !matches!(
            outcome,
            ProviderOutcome::NotSent { .. } | ProviderOutcome::Unknown { .. }
        );
        self.gate.record(reached, self.pass.probe);
        self.pass.probe = false;
        if let ProviderOutcome::NotSent {
            reason,
            retry_after,
        } = outcome
        {
            match retry_after {
                Some(after) => self.gate.slow_down(*after),
                None if reason.contains("HTTP 429") => self.gate.slow_down(DEFAULT_SLOWDOWN),
                None => {}
            }
        }
    }

    /// Waits for the account's pace (a safe repeat of an unknown answer).
    pub(super) async fn pace(&self) {
        self.gate.pace().await;
    }

    /// Before an in-process retry: `false` when the breaker opened
    /// meanwhile (stop retrying); otherwise waits for the account's pace.
    pub(super) async fn may_retry(&self) -> bool {
        if self.gate.breaker_state() != crate::providers::gate::BreakerState::Closed {
            return false;
        }
        self.gate.pace().await;
        true
    }
}

impl Worker {
    /// Passes `refund` through its account's gate, or parks the delivery
    /// (`None`).
    pub(super) async fn admit(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        refund: Unsent<'_>,
    ) -> Result<Option<Admitted>, PipelineError> {
        // Every configured account has a gate, and only configured accounts
        // get here (the claim stage checks); should one not, it is simply
        // unlimited: never drop the delivery.
        let gate = self
            .providers
            .gate(refund.provider)
            .cloned()
            .unwrap_or_else(|| Arc::new(Gate::new(refund.provider, &Default::default())));
        let share = (f64::from(self.settings.amqp.prefetch) * self.settings.amqp.account_share)
            .ceil()
            .max(1.0) as usize;
        let waiting = if gate.limited() {
            match gate.try_wait(share) {
                Some(waiting) => Some(waiting),
                None => {
                    self.park_throttled(publisher, delivery, refund).await?;
                    return Ok(None);
                }
            }
        } else {
            None
        };
        let started = Instant::now();
        let passed = gate.pass().await;
        drop(waiting);
        match passed {
            Ok(pass) => {
                metrics::gate_wait(refund.provider, started.elapsed());
                Ok(Some(Admitted { gate, pass }))
            }
            Err(Refusal::BreakerOpen) => {
                metrics::gate_parked(refund.provider, "breaker_open");
                self.park_breaker_open(publisher, delivery, refund).await?;
                Ok(None)
            }
        }
    }
}

impl Worker {
    /// The account's breaker is open: nothing is sent. The refund waits in
    /// the shortest delay queue and comes back soon after the breaker
    /// closes; its provider rounds are not used up (nothing failed for it),
    /// but it is not kept for ever: once the outage has lasted as long as
    /// all retries together would (`retry.deadline_ms` plus every
    /// `retry.delayed_ms`), it goes to the dead-letter queue as
    /// `provider_unavailable`, as it would without a breaker.
    async fn park_breaker_open(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        refund: Unsent<'_>,
    ) -> Result<(), PipelineError> {
        let now = now_rfc3339();
        let first = header_str(delivery, HEADER_FIRST_FAILURE).unwrap_or_else(|| now.clone());
        let retry = &self.settings.retry;
        let budget = Duration::from_millis(
            retry
                .deadline_ms
                .saturating_add(retry.delayed_ms.iter().sum::<u64>()),
        );
        let waited =
            time::OffsetDateTime::parse(&first, &time::format_description::well_known::Rfc3339)
                .map(|t| (time::OffsetDateTime::now_utc() - t).unsigned_abs())
                .unwrap_or_default();
        let reason = format!(
            "circuit breaker open for provider account {}: not called",
            refund.provider
        );
        let info = DeadLetter {
            kind: "provider_unavailable".into(),
            error: reason.clone(),
            attempts: refund.attempts,
            first_failure_at: first,
            last_failure_at: now,
            refund_id: Some(refund.refund_id.to_string()),
            provider: Some(refund.provider.to_string()),
            delayed_rounds: None,
            throttled: None,
        };
        let queues = delay_queues(&self.settings);
        match queues.first() {
            Some(queue) if waited < budget => {
                warn!(%reason, queue = queue.as_str(), "waiting in a delay queue");
                self.park(publisher, delivery, ParkTarget::DelayQueue(queue), &info)
                    .await
            }
            _ => {
                warn!(%reason, waited_s = waited.as_secs(), "outage longer than every retry together; the message goes to the dead-letter queue");
                self.dead_letter(publisher, delivery, &info).await
            }
        }
    }
}
