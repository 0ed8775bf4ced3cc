//! Stage 3, attempt: the provider call. "Not sent" answers are retried in
//! process with exponential backoff and jitter (the record says `NotSent`
//! between tries, `Attempting` durably before each request leaves); every
//! other answer class hands over to finish (confirmed, declined), to the
//! pending wait (accepted) or to park (unknown, misconfigured, out of
//! in-process retries).

use super::admit::Admitted;
use super::park::NotSentSoFar;
use super::{header_str, Inbound, PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::broker::HEADER_FIRST_FAILURE;
use crate::event::{now_rfc3339, OutcomeEvent, Status};
use crate::metrics;
use crate::providers::{Provider, ProviderOutcome};
use crate::store::{RefundRecord, RefundState};
use crate::trace::TraceContext;
use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

impl Worker {
    /// Calls the provider until it answers something other than "not sent",
    /// retrying that in process with exponential backoff and jitter.
    pub(super) async fn attempt(
        &self,
        publisher: &Publisher,
        inbound: Inbound<'_>,
        provider: &Provider,
        record: &mut RefundRecord,
        admitted: &mut Admitted,
    ) -> Result<(), PipelineError> {
        let delivery = inbound.delivery;
        let retry = &self.settings.retry;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(retry.initial_delay_ms))
            .with_max_delay(Duration::from_millis(retry.max_delay_ms))
            .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        let deadline = Instant::now() + Duration::from_millis(retry.deadline_ms);
        let started = Instant::now();
        let mut first_failure: Option<String> = header_str(delivery, HEADER_FIRST_FAILURE);
        loop {
            let call_started = Instant::now();
            let traceparent = TraceContext::current().map(|t| t.traceparent());
            let outcome = provider.execute(record, traceparent.as_deref()).await;
            admitted.answered(&outcome);
            metrics::provider_call(
                &record.command.provider,
                outcome.class(),
                call_started.elapsed(),
            );
            // One info line per refund ("refund outcome"); this one is
            // for debugging.
            debug!(
                attempt = record.attempts,
                class = outcome.class(),
                provider_ms = call_started.elapsed().as_millis() as u64,
                "provider answered"
            );
            let echo = record.command.echo();
            let attempts = record.attempts;
            match outcome {
                ProviderOutcome::Confirmed {
                    provider_txn,
                    performed,
                    code,
                    message,
                } => {
                    let mut event =
                        OutcomeEvent::new(&record.refund_id, Status::Succeeded, &echo, attempts);
                    event.performed = Some(performed);
                    event.provider_transaction_id = provider_txn;
                    event.provider_code = Some(code);
                    event.provider_message = message;
                    return self
                        .finish(publisher, inbound, record, event, started)
                        .await;
                }
                ProviderOutcome::Accepted { code, message } => {
                    let mut event =
                        OutcomeEvent::new(&record.refund_id, Status::Pending, &echo, attempts);
                    event.provider_code = Some(code);
                    event.provider_message = Some(message);
                    return self.wait_for_callback(publisher, record, event).await;
                }
                ProviderOutcome::Declined { code, message } => {
                    let mut event =
                        OutcomeEvent::new(&record.refund_id, Status::Failed, &echo, attempts)
                            .with_error("declined", format!("provider declined: {code} {message}"));
                    event.provider_code = Some(code);
                    event.provider_message = Some(message);
                    return self
                        .finish(publisher, inbound, record, event, started)
                        .await;
                }
                ProviderOutcome::Unknown { reason } => {
                    if provider.repeats_are_safe() && record.attempts < retry.max_attempts {
                        warn!(%reason, "outcome unknown; repeating: the provider deduplicates it");
                        admitted.pace().await;
                        self.begin_attempt(record).await?;
                        continue;
                    }
                    return self
                        .in_doubt(publisher, delivery, record.clone(), reason)
                        .await;
                }
                ProviderOutcome::Misconfigured { code, message } => {
                    let reason = format!("provider account rejected the request: {code} {message}");
                    return self
                        .park_misconfigured(publisher, delivery, record, reason, first_failure)
                        .await;
                }
                ProviderOutcome::NotSent {
                    reason,
                    retry_after,
                } => {
                    let now = now_rfc3339();
                    let first = first_failure.get_or_insert_with(|| now.clone()).clone();
                    record.transition(
                        RefundState::NotSent {
                            reason: reason.clone(),
                        },
                        format!("attempt {attempts} not sent: {reason}"),
                    );
                    self.store.put(record).await?;
                    let delay = delays
                        .next()
                        .map(|d| d.max(retry_after.unwrap_or_default()));
                    match delay {
                        Some(delay) if Instant::now() + delay < deadline => {
                            warn!(%reason, delay_ms = delay.as_millis() as u64, "not sent; retrying");
                            metrics::retry("in_process");
                            tokio::time::sleep(delay).await;
                            if !admitted.may_retry().await {
                                let so_far = NotSentSoFar {
                                    reason: format!(
                                        "{reason}; the account's circuit breaker opened"
                                    ),
                                    first_failure_at: first,
                                    last_failure_at: now,
                                };
                                return self
                                    .park_not_sent(publisher, delivery, record, so_far)
                                    .await;
                            }
                            self.begin_attempt(record).await?;
                        }
                        _ => {
                            let so_far = NotSentSoFar {
                                reason,
                                first_failure_at: first,
                                last_failure_at: now,
                            };
                            return self
                                .park_not_sent(publisher, delivery, record, so_far)
                                .await;
                        }
                    }
                }
            }
        }
    }
}
