//! The pipeline from one delivery to its ack.
//!
//! ```text
//! delivery ─▶ size / content type / JSON / refund_id ──bad──▶ dead letter, ack
//!          ─▶ provider known, fields valid ──────────bad──▶ `rejected` event, ack
//!          ─▶ lock refund_id, read the record:
//!               none ─────────▶ claim (Attempting, synced) ─▶ call provider
//!               other payload ▶ `rejected` (conflicting_payload), ack
//!               Finished ─────▶ re-publish the recorded event, ack
//!               InDoubt ──────▶ re-publish `in_doubt` if unconfirmed, park in dead letters, ack
//!               NotSent ──────▶ Attempting (synced) ─▶ call provider
//!               Attempting ───▶ a previous process crashed mid-call: outcome unknown
//!          ─▶ outcome recorded (synced) ─▶ event published (confirmed) ─▶ ack
//! ```
//!
//! Every decision comes from the stored record, so a redelivery, a restart
//! and a replay from the dead-letter queue take the same path. Nothing here
//! acks before the broker confirmed what the command produced; a failure to
//! store or publish puts the delivery back (after a pause) for a later try.

use crate::broker::publisher::{DeadLetter, ParkTarget, PublishError, Publisher};
use crate::broker::topology::delay_queues;
use crate::broker::{HEADER_DELAYED_ROUNDS, HEADER_FIRST_FAILURE};
use crate::command::{Echo, ParseError, RefundCommand};
use crate::config::Settings;
use crate::event::{now_rfc3339, OutcomeEvent, Status};
use crate::ledger::Reservation;
use crate::locks::RefundLocks;
use crate::metrics;
use crate::providers::{Provider, ProviderOutcome, Providers};
use crate::store::{RefundRecord, RefundState, Store, StoreError};
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, info_span, warn, Instrument};

/// Why a delivery could not be finished; it goes back to the queue.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker did not confirm an event or dead letter.
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
}

/// How long a delivery that failed to finish waits before it is put back,
/// so a broken store or broker does not turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Everything a delivery needs; shared by all in-flight deliveries.
#[derive(Debug, Clone)]
pub struct Worker {
    settings: Arc<Settings>,
    store: Store,
    providers: Providers,
    locks: RefundLocks,
    /// The current session's publisher, for events that do not answer a
    /// delivery (operator resolutions, provider callbacks).
    side: Arc<std::sync::Mutex<Option<Publisher>>>,
}

impl Worker {
    /// Builds the pipeline over an open store.
    pub fn new(settings: Arc<Settings>, store: Store, providers: Providers) -> Self {
        Worker {
            settings,
            store,
            providers,
            locks: RefundLocks::default(),
            side: Arc::default(),
        }
    }

    /// Makes the session's publisher available to events that do not answer
    /// a delivery; `None` when the session ends.
    pub fn set_side_publisher(&self, publisher: Option<Publisher>) {
        *self.side.lock().unwrap_or_else(|p| p.into_inner()) = publisher;
    }

    /// Publishes an event that does not answer a delivery: on the session's
    /// channel when there is one, else on a connection of its own.
    async fn publish_outside_delivery(&self, event: &OutcomeEvent) -> Result<(), String> {
        let current = self.side.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(publisher) = current {
            if publisher.publish_event(event).await.is_ok() {
                return Ok(());
            }
        }
        let connection = crate::broker::connect(&self.settings.amqp.url, "refund-worker-side")
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

    /// The store (for operators and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Processes one delivery and acks it, or puts it back when it could not
    /// be finished.
    pub async fn handle(&self, publisher: &Publisher, delivery: Delivery) {
        let span = info_span!(
            "delivery",
            refund_id = tracing::field::Empty,
            tag = delivery.delivery_tag
        );
        async {
            metrics::command_received();
            metrics::in_flight(1.0);
            let result = self.process(publisher, &delivery).await;
            metrics::in_flight(-1.0);
            match result {
                Ok(()) => {
                    if let Some(published) = delivery.properties.timestamp() {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        let took = (now - *published as f64).max(0.0);
                        metrics::end_to_end(Duration::from_secs_f64(took));
                    }
                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                        // The channel is gone: the broker redelivers, and the
                        // record turns the redelivery into a re-publication.
                        warn!(error = %e, "ack failed; the message will be redelivered");
                    }
                }
                Err(e) => {
                    error!(error = %e, "delivery not finished; putting it back");
                    tokio::time::sleep(REQUEUE_PAUSE).await;
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    if let Err(e) = delivery.acker.nack(requeue).await {
                        warn!(error = %e, "nack failed; the message will be redelivered");
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn process(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
    ) -> Result<(), PipelineError> {
        let amqp = &self.settings.amqp;
        if delivery.data.len() > amqp.max_body_bytes {
            let message = format!(
                "body of {} bytes exceeds amqp.max_body_bytes = {}",
                delivery.data.len(),
                amqp.max_body_bytes
            );
            return self
                .poison(publisher, delivery, "oversize", message, None)
                .await;
        }
        if let Some(ct) = delivery.properties.content_type() {
            let ct = ct.as_str();
            if !ct
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
            {
                let message = format!("content_type {ct:?} is not application/json");
                return self
                    .poison(publisher, delivery, "wrong_content_type", message, None)
                    .await;
            }
        }
        let command = match RefundCommand::parse(&delivery.data) {
            Ok(command) => command,
            Err(ParseError::Poison(p)) => {
                return self
                    .poison(publisher, delivery, p.kind, p.message, None)
                    .await
            }
            Err(ParseError::Invalid(invalid)) => {
                tracing::Span::current().record("refund_id", invalid.refund_id.as_str());
                return self
                    .reject(
                        publisher,
                        &invalid.refund_id,
                        &invalid.echo,
                        "invalid_command",
                        invalid.message,
                    )
                    .await;
            }
        };
        tracing::Span::current().record("refund_id", command.refund_id.as_str());
        let Some(provider) = self.providers.get(&command.provider) else {
            let message = format!(
                "provider {:?} is not a configured account (configured: {})",
                command.provider,
                self.providers.names().join(", ")
            );
            return self
                .reject(
                    publisher,
                    &command.refund_id,
                    &command.echo(),
                    "unknown_provider",
                    message,
                )
                .await;
        };
        if let Err(message) = provider.check(&command) {
            return self
                .reject(
                    publisher,
                    &command.refund_id,
                    &command.echo(),
                    "invalid_command",
                    message,
                )
                .await;
        }

        let _guard = self.locks.lock(&command.refund_id).await;
        if let Some(original) = command.original_amount {
            if self.store.get(&command.refund_id)?.is_none() {
                if let Err(over) = self.store.reserve(&command, original)? {
                    let message = format!(
                        "refunding {} would exceed original_amount {}: {} already refunded or in flight",
                        over.requested, over.original_amount, over.reserved
                    );
                    return self
                        .reject(
                            publisher,
                            &command.refund_id,
                            &command.echo(),
                            "over_refund",
                            message,
                        )
                        .await;
                }
            }
        }
        let fresh = RefundRecord::attempting(&command);
        let mut record = match self.store.claim(&fresh)? {
            None => {
                self.store.sync().await?;
                debug!("claimed");
                fresh
            }
            Some(existing) => {
                if existing.payload_hash != fresh.payload_hash {
                    let message = format!(
                        "refund_id {} was already used for a different command (first seen {}); \
                         the original refund is not affected",
                        command.refund_id, existing.created_at
                    );
                    return self
                        .reject(
                            publisher,
                            &command.refund_id,
                            &command.echo(),
                            "conflicting_payload",
                            message,
                        )
                        .await;
                }
                match existing.state.clone() {
                    RefundState::Finished { event } => {
                        info!(
                            status = event.status.as_str(),
                            "duplicate: re-publishing the recorded outcome"
                        );
                        return self.publish_recorded(publisher, &event).await;
                    }
                    RefundState::Pending { event, .. } => {
                        info!(
                            "duplicate of a pending refund: re-publishing `pending`, not executing"
                        );
                        return self.publish_recorded(publisher, &event).await;
                    }
                    RefundState::InDoubt { event } => {
                        warn!("refund is in doubt: not executing it again until an operator resolves it");
                        self.publish_recorded(publisher, &event).await?;
                        return self.park_in_doubt(publisher, delivery, &event).await;
                    }
                    RefundState::NotSent { .. } => {
                        let mut record = existing;
                        self.begin_attempt(&mut record).await?;
                        record
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
                            record
                        } else {
                            return self.in_doubt(publisher, delivery, record, reason).await;
                        }
                    }
                }
            }
        };
        self.attempt(publisher, delivery, provider, &mut record)
            .await
    }

    /// Records a new attempt durably before the request leaves.
    async fn begin_attempt(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        record.attempts += 1;
        let note = format!("attempt {} started", record.attempts);
        record.transition(
            RefundState::Attempting {
                since: now_rfc3339(),
            },
            note,
        );
        self.store.put(record)?;
        self.store.sync().await
    }

    /// Calls the provider until it answers something other than "not sent",
    /// retrying that in process with exponential backoff and jitter.
    async fn attempt(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        provider: &Provider,
        record: &mut RefundRecord,
    ) -> Result<(), PipelineError> {
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
            let outcome = provider.execute(record).await;
            metrics::provider_call(
                &record.command.provider,
                outcome.class(),
                call_started.elapsed(),
            );
            info!(
                attempt = record.attempts,
                class = outcome.class(),
                provider_ms = call_started.elapsed().as_millis() as u64,
                "provider answered"
            );
            let echo = record.command.echo();
            let refund_id = record.refund_id.clone();
            let attempts = record.attempts;
            match outcome {
                ProviderOutcome::Confirmed {
                    provider_txn,
                    performed,
                    code,
                    message,
                } => {
                    let mut event =
                        OutcomeEvent::new(&refund_id, Status::Succeeded, &echo, attempts);
                    event.performed = Some(performed);
                    event.provider_transaction_id = provider_txn;
                    event.provider_code = Some(code);
                    event.provider_message = message;
                    return self.finish(publisher, record, event, started).await;
                }
                ProviderOutcome::Accepted { code, message } => {
                    let mut event = OutcomeEvent::new(&refund_id, Status::Pending, &echo, attempts);
                    event.provider_code = Some(code);
                    event.provider_message = Some(message);
                    let since = now_rfc3339();
                    record.transition(
                        RefundState::Pending {
                            event: event.clone(),
                            since,
                        },
                        "accepted by the provider; waiting for its callback",
                    );
                    self.store.put(record)?;
                    self.store.sync().await?;
                    metrics::outcome(&record.command.provider, "pending");
                    info!(status = "pending", attempts, "refund outcome");
                    return self.publish_recorded(publisher, &event).await;
                }
                ProviderOutcome::Declined { code, message } => {
                    let mut event = OutcomeEvent::new(&refund_id, Status::Failed, &echo, attempts)
                        .with_error("declined", format!("provider declined: {code} {message}"));
                    event.provider_code = Some(code);
                    event.provider_message = Some(message);
                    return self.finish(publisher, record, event, started).await;
                }
                ProviderOutcome::Unknown { reason } => {
                    if provider.repeats_are_safe() && record.attempts < retry.max_attempts {
                        warn!(%reason, "outcome unknown; repeating: the provider deduplicates it");
                        self.begin_attempt(record).await?;
                        continue;
                    }
                    return self
                        .in_doubt(publisher, delivery, record.clone(), reason)
                        .await;
                }
                ProviderOutcome::Misconfigured { code, message } => {
                    let reason = format!("provider account rejected the request: {code} {message}");
                    error!(%reason, "fix the provider account configuration, then replay from the dead-letter queue");
                    record.transition(
                        RefundState::NotSent {
                            reason: reason.clone(),
                        },
                        reason.clone(),
                    );
                    self.store.put(record)?;
                    self.store.sync().await?;
                    let now = now_rfc3339();
                    let info = DeadLetter {
                        kind: "provider_misconfigured".into(),
                        error: reason,
                        attempts,
                        first_failure_at: first_failure.unwrap_or_else(|| now.clone()),
                        last_failure_at: now,
                        refund_id: Some(refund_id),
                        provider: Some(record.command.provider.clone()),
                        delayed_rounds: None,
                    };
                    return self.dead_letter(publisher, delivery, &info).await;
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
                    self.store.put(record)?;
                    let delay = delays
                        .next()
                        .map(|d| d.max(retry_after.unwrap_or_default()));
                    match delay {
                        Some(delay) if Instant::now() + delay < deadline => {
                            warn!(%reason, delay_ms = delay.as_millis() as u64, "not sent; retrying");
                            metrics::retry("in_process");
                            tokio::time::sleep(delay).await;
                            self.begin_attempt(record).await?;
                        }
                        _ => {
                            self.store.sync().await?;
                            let rounds = header_u32(delivery, HEADER_DELAYED_ROUNDS).unwrap_or(0);
                            let error =
                                format!("provider unavailable after {attempts} attempts: {reason}");
                            let mut info = DeadLetter {
                                kind: "provider_unavailable".into(),
                                error,
                                attempts,
                                first_failure_at: first,
                                last_failure_at: now,
                                refund_id: Some(refund_id),
                                provider: Some(record.command.provider.clone()),
                                delayed_rounds: Some(rounds),
                            };
                            let queues = delay_queues(&self.settings);
                            return match queues.get(rounds as usize) {
                                Some(queue) => {
                                    warn!(%info.error, queue = queue.as_str(), "not sent; waiting in a delay queue");
                                    info.delayed_rounds = Some(rounds + 1);
                                    metrics::retry("delayed");
                                    self.park(
                                        publisher,
                                        delivery,
                                        ParkTarget::DelayQueue(queue),
                                        &info,
                                    )
                                    .await
                                }
                                None => {
                                    warn!(%info.error, "giving up; the message goes to the dead-letter queue");
                                    self.dead_letter(publisher, delivery, &info).await
                                }
                            };
                        }
                    }
                }
            }
        }
    }

    /// Records a final outcome durably, then publishes it.
    async fn finish(
        &self,
        publisher: &Publisher,
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
        self.store.put(record)?;
        let reservation = match event.status {
            Status::Succeeded => Some(Reservation::Succeeded),
            _ => None,
        };
        self.store.settle(&record.command, reservation)?;
        self.store.sync().await?;
        metrics::outcome(&record.command.provider, event.status.as_str());
        info!(
            provider = record.command.provider.as_str(),
            status = event.status.as_str(),
            attempts = event.attempts,
            latency_ms = started.elapsed().as_millis() as u64,
            "refund outcome"
        );
        self.publish_recorded(publisher, &event).await
    }

    /// Publishes an event that is already durable in the record. Whether the
    /// broker confirmed it is not written back: a redelivery re-publishes
    /// it with the same `event_id`, which consumers deduplicate, and one
    /// record write less per message matters on the hot path.
    async fn publish_recorded(
        &self,
        publisher: &Publisher,
        event: &OutcomeEvent,
    ) -> Result<(), PipelineError> {
        publisher.publish_event(event).await?;
        Ok(())
    }

    /// The outcome may or may not have happened: record it as in doubt,
    /// tell accounting once, park the message for an operator.
    async fn in_doubt(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        mut record: RefundRecord,
        reason: String,
    ) -> Result<(), PipelineError> {
        error!(%reason, "outcome unknown: the refund is in doubt and will not be sent again");
        let event = OutcomeEvent::new(
            &record.refund_id,
            Status::InDoubt,
            &record.command.echo(),
            record.attempts,
        )
        .with_error("outcome_unknown", reason.clone());
        record.transition(
            RefundState::InDoubt {
                event: event.clone(),
            },
            format!("in doubt: {reason}"),
        );
        metrics::outcome(&record.command.provider, "in_doubt");
        self.store.put(&record)?;
        self.store
            .settle(&record.command, Some(Reservation::InDoubt))?;
        self.store.sync().await?;
        self.publish_recorded(publisher, &event).await?;
        self.park_in_doubt(publisher, delivery, &event).await
    }

    async fn park_in_doubt(
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
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    /// Publishes a `rejected` event. Not recorded: a rejection depends only
    /// on the message (and configuration), so a redelivery rejects it again
    /// with the same `event_id`, and a corrected command may re-use the id.
    async fn reject(
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
        metrics::outcome(echo.provider.as_deref().unwrap_or(""), "rejected");
        publisher.publish_event(&event).await?;
        Ok(())
    }

    /// Dead-letters a message that cannot be tied to a refund.
    async fn poison(
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
        };
        self.dead_letter(publisher, delivery, &info).await
    }

    async fn dead_letter(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        info: &DeadLetter,
    ) -> Result<(), PipelineError> {
        self.park(publisher, delivery, ParkTarget::DeadLetters, info)
            .await
    }

    async fn park(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        target: ParkTarget<'_>,
        info: &DeadLetter,
    ) -> Result<(), PipelineError> {
        // A replayed message keeps the exchange and routing key it was first
        // published with.
        let exchange = header_str(delivery, crate::broker::HEADER_ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| delivery.exchange.to_string());
        let routing_key = header_str(delivery, crate::broker::HEADER_ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.to_string());
        if matches!(target, ParkTarget::DeadLetters) {
            metrics::dead_lettered(&info.kind);
        }
        publisher
            .park(
                target,
                &delivery.data,
                &delivery.properties,
                &exchange,
                &routing_key,
                info,
            )
            .await?;
        Ok(())
    }
}

/// An integer header of the delivery, if present.
fn header_u32(delivery: &Delivery, key: &str) -> Option<u32> {
    let headers = delivery.properties.headers().as_ref()?;
    let value = match headers.inner().get(key)? {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::LongString(s) => s.to_string().parse().ok()?,
        _ => return None,
    };
    u32::try_from(value).ok()
}

/// A string header of the delivery, if present.
fn header_str(delivery: &Delivery, key: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// How an operator settled an in-doubt refund after checking with the
/// provider. Exactly one of `executed` and `not_executed`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resolution {
    /// The provider executed it: its transaction id.
    #[serde(default)]
    pub executed: Option<String>,
    /// The provider did not execute it: allow one new attempt (via replay).
    #[serde(default)]
    pub not_executed: bool,
    /// Who decided.
    pub by: String,
    /// Why (ticket, provider answer).
    pub reason: String,
}

/// Why a resolution was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No record for that refund.
    #[error("no refund {0} in the store")]
    NotFound(String),
    /// Only in-doubt refunds can be resolved.
    #[error("refund {refund_id} is {state}, not in doubt: nothing to resolve")]
    NotInDoubt {
        /// The refund.
        refund_id: String,
        /// Its state.
        state: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recorded, but the event could not be published yet.
    #[error("resolution recorded, but the succeeded event was not published ({0}); replaying the refund's dead-lettered message publishes it")]
    Publish(String),
}

impl Worker {
    /// Settles an in-doubt refund. `executed` records and publishes the
    /// final `succeeded` event; `not_executed` makes the refund eligible for
    /// one new attempt, which a replay of its dead-lettered message starts.
    /// Both are noted in the refund's history with who and why.
    pub async fn resolve(
        &self,
        refund_id: &str,
        resolution: Resolution,
    ) -> Result<RefundRecord, ResolveError> {
        if resolution.by.trim().is_empty() || resolution.reason.trim().is_empty() {
            return Err(ResolveError::Invalid(
                "who (by) and why (reason) are required".into(),
            ));
        }
        let executed = match (&resolution.executed, resolution.not_executed) {
            (Some(txn), false) if !txn.trim().is_empty() => Some(txn.trim().to_string()),
            (None, true) => None,
            _ => {
                return Err(ResolveError::Invalid(
                    "give exactly one of: executed <provider transaction id>, not_executed".into(),
                ))
            }
        };
        let _guard = self.locks.lock(refund_id).await;
        let mut record = self
            .store
            .get(refund_id)?
            .ok_or_else(|| ResolveError::NotFound(refund_id.to_string()))?;
        if !matches!(record.state, RefundState::InDoubt { .. }) {
            return Err(ResolveError::NotInDoubt {
                refund_id: refund_id.to_string(),
                state: record_status(&record).to_string(),
            });
        }
        let who = format!("by {}: {}", resolution.by.trim(), resolution.reason.trim());
        match executed {
            Some(txn) => {
                let mut event = OutcomeEvent::new(
                    refund_id,
                    Status::Succeeded,
                    &record.command.echo(),
                    record.attempts,
                );
                event.performed = Some(record.command.operation);
                event.provider_transaction_id = Some(txn.clone());
                event.provider_message = Some(format!("resolved as executed {who}"));
                record.transition(
                    RefundState::Finished {
                        event: event.clone(),
                    },
                    format!("resolved as executed (provider transaction {txn}) {who}"),
                );
                self.store.put(&record)?;
                self.store
                    .settle(&record.command, Some(Reservation::Succeeded))?;
                self.store.sync().await?;
                metrics::outcome(&record.command.provider, "succeeded");
                warn!(refund_id, provider_transaction_id = txn.as_str(), %who, "in-doubt refund resolved as executed");
                self.publish_outside_delivery(&event)
                    .await
                    .map_err(ResolveError::Publish)?;
            }
            None => {
                let note = format!("resolved as not executed {who}; one new attempt allowed");
                record.transition(
                    RefundState::NotSent {
                        reason: note.clone(),
                    },
                    note.clone(),
                );
                self.store.put(&record)?;
                self.store
                    .settle(&record.command, Some(Reservation::InFlight))?;
                self.store.sync().await?;
                warn!(refund_id, %who, "in-doubt refund resolved as not executed; replay it to retry");
            }
        }
        Ok(record)
    }
}

/// The status an operator sees: the event status of a finished refund,
/// otherwise the lifecycle state (`attempting`, `not_sent`, `in_doubt`).
pub fn record_status(record: &RefundRecord) -> &'static str {
    match &record.state {
        RefundState::Finished { event } => event.status.as_str(),
        other => other.name(),
    }
}

/// What a provider callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The pending refund got its final outcome (event published).
    Finalised(Status),
    /// The same final answer again: recorded, nothing new published.
    Repeated,
    /// A different answer after a final one: recorded and logged for a
    /// person; no second final event.
    Contradicted,
}

/// Why a callback was refused.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// Unknown refund or wrong token (a forged or misrouted callback).
    #[error("no pending refund matches this callback")]
    NotFound,
    /// The body is not a Paynet callback.
    #[error("{0}")]
    Invalid(String),
    /// The refund is not waiting for a callback.
    #[error("refund {0} is not waiting for a provider callback")]
    NotPending(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recorded, but the event could not be published yet.
    #[error("recorded, but the event was not published ({0}); a repeated callback or a redelivery publishes it")]
    Publish(String),
}

impl Worker {
    /// Handles Paynet's post to a refund's `succeedUrl`. The callback is not
    /// signed, so it must carry the refund's unguessable token, and it only
    /// ever moves a `pending` refund to its final state once.
    pub async fn paynet_callback(
        &self,
        refund_id: &str,
        token: &str,
        body: &[u8],
    ) -> Result<CallbackOutcome, CallbackError> {
        let callback =
            crate::providers::paynet::wire::parse_callback(body).map_err(CallbackError::Invalid)?;
        let _guard = self.locks.lock(refund_id).await;
        let Some(mut record) = self.store.get(refund_id)? else {
            warn!(refund_id, "callback for an unknown refund ignored");
            return Err(CallbackError::NotFound);
        };
        if !constant_time_eq(record.callback_token.as_bytes(), token.as_bytes()) {
            warn!(
                refund_id,
                "callback with a wrong token ignored (forged or misrouted)"
            );
            return Err(CallbackError::NotFound);
        }
        let status = if callback.approved {
            Status::Succeeded
        } else {
            Status::Failed
        };
        let note = format!(
            "callback: code {} status {:?} xact_id {:?} message {:?}",
            callback.code, callback.status, callback.xact_id, callback.message
        );
        match record.state.clone() {
            RefundState::Pending { .. } => {
                let mut event =
                    OutcomeEvent::new(refund_id, status, &record.command.echo(), record.attempts);
                event.performed = callback.approved.then_some(record.command.operation);
                event.provider_transaction_id =
                    Some(callback.xact_id.clone()).filter(|x| !x.is_empty());
                event.provider_code = Some(callback.code.clone());
                event.provider_message = Some(callback.message.clone());
                if !callback.approved {
                    event = event.with_error(
                        "declined",
                        format!("provider disapproved: {}", callback.message),
                    );
                }
                record.transition(
                    RefundState::Finished {
                        event: event.clone(),
                    },
                    note,
                );
                self.store.put(&record)?;
                let reservation = callback.approved.then_some(Reservation::Succeeded);
                self.store.settle(&record.command, reservation)?;
                self.store.sync().await?;
                metrics::outcome(&record.command.provider, status.as_str());
                info!(
                    refund_id,
                    provider = record.command.provider.as_str(),
                    status = status.as_str(),
                    attempts = record.attempts,
                    "refund outcome"
                );
                self.publish_outside_delivery(&event)
                    .await
                    .map_err(CallbackError::Publish)?;
                Ok(CallbackOutcome::Finalised(status))
            }
            RefundState::Finished { event } if event.status == status => {
                record.transition(record.state.clone(), format!("repeated {note}"));
                self.store.put(&record)?;
                // Publishing again is harmless (same event_id) and covers a
                // first publication that failed.
                let _ = self.publish_outside_delivery(&event).await;
                Ok(CallbackOutcome::Repeated)
            }
            RefundState::Finished { event } => {
                error!(
                    refund_id,
                    recorded = event.status.as_str(),
                    received = status.as_str(),
                    "contradictory provider callback: recorded, no new event; a person must reconcile it"
                );
                metrics::contradiction(&record.command.provider);
                record.transition(
                    record.state.clone(),
                    format!("CONTRADICTS the recorded {}: {note}", event.status.as_str()),
                );
                self.store.put(&record)?;
                self.store.sync().await?;
                Ok(CallbackOutcome::Contradicted)
            }
            other => Err(CallbackError::NotPending(format!(
                "{refund_id} ({})",
                other.name()
            ))),
        }
    }
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
