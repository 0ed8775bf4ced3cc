//! Stage 3, attempt: the provider call. "Not sent" answers are retried in
//! process with exponential backoff and jitter (the record says `NotSent`
//! between tries, `Attempting` durably before each request leaves); every
//! other answer class hands over to finish (confirmed, declined), to the
//! pending wait (accepted) or to park (unknown, misconfigured, out of
//! in-process retries). An unknown outcome is repeated only when the
//! attempt's record says the provider deduplicates it.

use super::admit::Admitted;
use super::park::NotSentSoFar;
use super::{header_str, Inbound, PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::broker::HEADER_FIRST_FAILURE;
use crate::config::RetrySettings;
use crate::contract::event::{now_rfc3339, OutcomeEvent, Status};
use crate::observability::metrics;
use crate::observability::trace::TraceContext;
use crate::providers::{Provider, ProviderOutcome};
use crate::store::ledger::LedgerChange;
use crate::store::{RefundRecord, RefundState};
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// The in-process retries of requests that were not sent.
struct Retries {
    delays: backon::ExponentialBackoff,
    deadline: Instant,
    /// RFC 3339; from the message's header when an earlier round failed.
    first_failure: Option<String>,
}

impl Retries {
    fn new(retry: &RetrySettings, delivery: &Delivery) -> Self {
        Retries {
            delays: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(retry.initial_delay_ms))
                .with_max_delay(Duration::from_millis(retry.max_delay_ms))
                .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
                .with_jitter()
                .build(),
            deadline: Instant::now() + Duration::from_millis(retry.deadline_ms),
            first_failure: header_str(delivery, HEADER_FIRST_FAILURE),
        }
    }
}

/// What to do after an answer.
enum Next {
    /// Call again (the record says `Attempting` again).
    Again,
    /// The delivery is settled.
    Done,
}

impl Worker {
    /// Calls the provider until it answers something other than "not sent"
    /// or an unknown outcome that may be repeated.
    pub(super) async fn attempt(
        &self,
        publisher: &Publisher,
        inbound: Inbound<'_>,
        provider: &Provider,
        record: &mut RefundRecord,
        admitted: &mut Admitted,
    ) -> Result<(), PipelineError> {
        let delivery = inbound.delivery;
        let mut retries = Retries::new(&self.settings.retry, delivery);
        let started = Instant::now();
        loop {
            let outcome = self.call(publisher, provider, record, admitted).await?;
            match outcome {
                ProviderOutcome::Confirmed {
                    provider_txn,
                    performed,
                    code,
                    message,
                } => {
                    let mut event = event_of(record, Status::Succeeded, code, message);
                    event.performed = Some(performed);
                    event.provider_transaction_id = provider_txn;
                    record.answered();
                    return self
                        .finish(publisher, inbound, record, event, started)
                        .await;
                }
                ProviderOutcome::Accepted { code, message } => {
                    let event = event_of(record, Status::Pending, code, Some(message));
                    return self.wait_for_callback(publisher, record, event).await;
                }
                ProviderOutcome::Declined { code, message } => {
                    let error = format!("provider declined: {code} {message}");
                    let event = event_of(record, Status::Failed, code, Some(message))
                        .with_error("declined", error);
                    record.answered();
                    return self
                        .finish(publisher, inbound, record, event, started)
                        .await;
                }
                ProviderOutcome::Unknown { reason } => {
                    let next = self.after_unknown(provider, record, admitted, &reason);
                    if let Next::Again = next.await? {
                        continue;
                    }
                    return self
                        .in_doubt(publisher, delivery, record.clone(), reason)
                        .await;
                }
                ProviderOutcome::Misconfigured { code, message } => {
                    let reason = format!("provider account rejected the request: {code} {message}");
                    let first = retries.first_failure.take();
                    return self
                        .park_misconfigured(publisher, delivery, record, reason, first)
                        .await;
                }
                ProviderOutcome::NotSent {
                    reason,
                    retry_after,
                } => {
                    let answer = (reason, retry_after);
                    let next = self.after_not_sent(
                        publisher,
                        delivery,
                        provider,
                        record,
                        admitted,
                        &mut retries,
                        answer,
                    );
                    if let Next::Done = next.await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One request, as the record's attempt says. Refused before it leaves
    /// when events cannot be published (a channel the broker closed): a
    /// refund paid then could not be told.
    async fn call(
        &self,
        publisher: &Publisher,
        provider: &Provider,
        record: &mut RefundRecord,
        admitted: &mut Admitted,
    ) -> Result<ProviderOutcome, PipelineError> {
        if !publisher.is_open() {
            let reason = "not sent: events cannot be published now (the session's channel is \
                          closed); the refund waits until they can"
                .to_string();
            self.not_sent_after_all(record, reason).await;
            return Err(PipelineError::EventsDown);
        }
        if !self.store.lease_holds() {
            // Frozen or cut off past the lease: another replica may have
            // settled this attempt already. Nothing leaves.
            let reason = "not sent: this replica's lease may have expired".to_string();
            self.not_sent_after_all(record, reason).await;
            return Err(PipelineError::LeaseLost);
        }
        let call_started = Instant::now();
        let traceparent = TraceContext::current().map(|t| t.traceparent());
        let outcome = provider.execute(record, traceparent.as_deref()).await;
        admitted.answered(&outcome);
        metrics::provider_call(
            &record.command.provider,
            outcome.class(),
            call_started.elapsed(),
        );
        // One info line per refund ("refund outcome"); this one is for
        // debugging.
        debug!(
            attempt = record.attempts,
            class = outcome.class(),
            provider_ms = call_started.elapsed().as_millis() as u64,
            "provider answered"
        );
        Ok(outcome)
    }

    /// The answer was lost: the attempt may have been executed. It is
    /// repeated (`Again`) only when the record says the provider
    /// deduplicates it, within `retry.max_attempts`; otherwise the caller
    /// records the refund in doubt (`Done`).
    async fn after_unknown(
        &self,
        provider: &Provider,
        record: &mut RefundRecord,
        admitted: &Admitted,
        reason: &str,
    ) -> Result<Next, PipelineError> {
        record.note_uncertain();
        if record.attempts >= self.settings.retry.max_attempts {
            return Ok(Next::Done);
        }
        let Ok(trace) = Self::next_trace(record, provider) else {
            return Ok(Next::Done);
        };
        warn!(%reason, "outcome unknown; repeating the same request: the provider deduplicates it");
        admitted.pace().await;
        self.begin_attempt(record, trace).await?;
        Ok(Next::Again)
    }

    /// The request surely did not reach the provider: the record says so,
    /// and it is tried again after a backoff, or parked (a delay queue, the
    /// dead-letter queue) when the retries are used up or the account's
    /// breaker opened.
    #[allow(clippy::too_many_arguments)]
    async fn after_not_sent(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        provider: &Provider,
        record: &mut RefundRecord,
        admitted: &Admitted,
        retries: &mut Retries,
        (reason, retry_after): (String, Option<Duration>),
    ) -> Result<Next, PipelineError> {
        let now = now_rfc3339();
        let first = retries
            .first_failure
            .get_or_insert_with(|| now.clone())
            .clone();
        let attempts = record.attempts;
        record.transition(
            RefundState::NotSent {
                reason: reason.clone(),
            },
            format!("attempt {attempts} not sent: {reason}"),
        );
        self.write_after_call(record, LedgerChange::Keep).await?;
        let mut so_far = NotSentSoFar {
            reason,
            first_failure_at: first,
            last_failure_at: now,
        };
        let delay = retries
            .delays
            .next()
            .map(|d| d.max(retry_after.unwrap_or_default()));
        let Some(delay) = delay.filter(|d| Instant::now() + *d < retries.deadline) else {
            self.park_not_sent(publisher, delivery, record, so_far)
                .await?;
            return Ok(Next::Done);
        };
        warn!(reason = %so_far.reason, delay_ms = delay.as_millis() as u64, "not sent; retrying");
        metrics::retry("in_process");
        tokio::time::sleep(delay).await;
        if !admitted.may_retry().await {
            so_far.reason = format!("{}; the account's circuit breaker opened", so_far.reason);
            self.park_not_sent(publisher, delivery, record, so_far)
                .await?;
            return Ok(Next::Done);
        }
        match Self::next_trace(record, provider) {
            Ok(trace) => {
                self.begin_attempt(record, trace).await?;
                Ok(Next::Again)
            }
            Err(why) => {
                self.in_doubt(publisher, delivery, record.clone(), why)
                    .await?;
                Ok(Next::Done)
            }
        }
    }
}

/// The event of a provider's answer with its code and message.
fn event_of(
    record: &RefundRecord,
    status: Status,
    code: String,
    message: Option<String>,
) -> OutcomeEvent {
    let mut event = OutcomeEvent::new(
        &record.refund_id,
        status,
        &record.command.echo(),
        record.attempts,
    );
    event.provider_code = Some(code);
    event.provider_message = message;
    event
}
