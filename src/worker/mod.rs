//! The pipeline from one delivery to its ack, one file per stage of a
//! refund's life:
//!
//! ```text
//! delivery ─▶ intake   size / content type / JSON / refund_id ──bad──▶ dead letter, ack
//!          ─▶ claim    lock refund_id, read the record:
//!                        none ─────────▶ provider known, fields valid? ──no──▶ `rejected`, ack
//!                                        ─▶ ledger reservation ─▶ Attempting (synced)
//!                        other payload ▶ `rejected` (conflicting_payload), ack
//!                        Finished / tombstone ▶ re-publish the recorded event, ack
//!                        InDoubt ──────▶ re-publish `in_doubt`, park in dead letters, ack
//!                        NotSent ──────▶ Attempting (synced)
//!                        Attempting ───▶ a previous process crashed mid-call: unknown
//!          ─▶ admit    the account's gate: breaker, share of the slots, limits
//!          ─▶ attempt  provider call, in-process retries, classification
//!          ─▶ finish   outcome recorded (synced) ─▶ event published (confirmed) ─▶ ack
//!          ─▶ park     delay queues, dead letters, in doubt
//! resolve    an operator settles an in-doubt refund, releases or abandons one
//! callbacks  Paynet posts the final answer of a pending (or doubtful) refund
//! outbox     events recorded but not confirmed are published again
//! ```
//!
//! Every decision comes from the stored record, so a redelivery, a restart
//! and a replay from the dead-letter queue take the same path. Nothing here
//! acks before the broker confirmed what the command produced; a failure to
//! store or publish puts the delivery back (after a pause) for a later try.
//! `docs/architecture.md` has the whole picture.

mod admit;
mod amend;
mod attempt;
mod callbacks;
mod claim;
mod finish;
mod intake;
mod outbox;
mod park;
mod resolve;

pub use callbacks::{CallbackError, CallbackOutcome};
pub use outbox::SweepReport;
pub use resolve::{record_status, Decision, Resolution, ResolveError};

use crate::broker::publisher::{PublishError, Publisher};
use crate::config::Settings;
use crate::locks::RefundLocks;
use crate::metrics;
use crate::providers::Providers;
use crate::store::{Store, StoreError};
use crate::trace::TraceContext;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info_span, warn, Instrument};

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
    /// delivery (operator resolutions, provider callbacks, the outbox).
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

    /// The store (for operators and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The provider accounts (and their gates).
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Processes one delivery and acks it, or puts it back when it could not
    /// be finished.
    pub async fn handle(&self, publisher: &Publisher, delivery: Delivery) {
        // The refund's span: a child of the publisher's span when the
        // command carries a valid `traceparent` (see `trace.rs`).
        let parent = TraceContext::from_headers(delivery.properties.headers().as_ref());
        let mut context = TraceContext::child_of(parent.as_ref());
        let span = info_span!(
            "delivery",
            refund_id = tracing::field::Empty,
            tag = delivery.delivery_tag,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        if crate::telemetry::otlp_enabled() {
            // Exported spans: OpenTelemetry assigns the ids, under the
            // caller's trace.
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            if let Some(parent) = &parent {
                let _ = span.set_parent(parent.otel_parent());
            }
            if let Some(exported) = TraceContext::of_span(&span, context.tracestate.clone()) {
                context = exported;
            }
        }
        span.record("trace_id", context.trace_id.as_str());
        span.record("span_id", context.span_id.as_str());
        let work = async {
            let started = std::time::Instant::now();
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
                    metrics::processing(started.elapsed());
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
        .instrument(span);
        context.scope(work).await
    }

    /// The stages in order; each returns early when it settled the delivery.
    async fn process(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
    ) -> Result<(), PipelineError> {
        let Some(command) = self.intake(publisher, delivery).await? else {
            return Ok(());
        };
        let _guard = self.locks.lock(&command.refund_id).await;
        let Some((provider, mut record, mut admitted)) =
            self.claim(publisher, delivery, &command).await?
        else {
            return Ok(());
        };
        self.attempt(publisher, delivery, provider, &mut record, &mut admitted)
            .await
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
