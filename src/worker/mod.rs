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
//! outbox     events that answer no delivery, recorded but not confirmed, are published again
//! ```
//!
//! Every decision comes from the stored record, so a redelivery, a restart
//! and a replay from the dead-letter queue take the same path. Nothing here
//! acks before what the command produced is safe: durable in the record
//! and confirmed by the broker (see `finish.rs`). A failure to store or
//! publish before that puts the delivery back (after a pause) for a later
//! try, and its redelivery publishes the recorded event.
//! `docs/architecture.md` has the whole picture.

mod abandon;
mod admit;
mod amend;
mod attempt;
mod callbacks;
mod claim;
mod cut_off;
mod finish;
mod intake;
mod known;
pub mod locks;
mod outbox;
mod park;
mod resolve;
mod written;

pub use abandon::{Abandoned, Carrier};
pub use callbacks::{CallbackError, CallbackOutcome};
pub use outbox::SweepReport;
pub use resolve::{Decision, Resolution, ResolveError};

use crate::broker::publisher::{PublishError, Publisher};
use crate::config::Settings;
use crate::observability::metrics;
use crate::observability::trace::TraceContext;
use crate::providers::Providers;
use crate::store::{Store, StoreError};
use crate::worker::locks::RefundLocks;
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, DeliveryTag};
use lapin::Channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info_span, warn, Instrument};

impl PipelineError {
    /// Its metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Store(StoreError::Fenced { .. }) => "fenced",
            PipelineError::Store(_) => "store",
            PipelineError::Publish(_) => "publish",
            PipelineError::Busy => "busy",
            PipelineError::EventsDown => "events_down",
            PipelineError::LeaseLost => "lease_lost",
        }
    }
}

/// Why a delivery could not be finished; it goes back to the queue.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker did not confirm an event or dead letter.
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    /// Another replica is attempting the refund and no delay queue is
    /// configured to wait in.
    #[error("another replica is attempting this refund; putting the copy back")]
    Busy,
    /// Events cannot be published now (the session's channel is closed):
    /// no provider is called until they can.
    #[error("events cannot be published now; no provider call until they can")]
    EventsDown,
    /// This replica's lease may have expired: no provider call until it
    /// holds one again.
    #[error("this replica's lease may have expired; no provider call until it holds one")]
    LeaseLost,
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
            store,
            providers,
            locks: RefundLocks::default(),
            side: Arc::default(),
            settings,
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
    /// `channel` is the one the delivery came on; its ack goes there.
    /// `slot`, when given, is let go with the ack (or when the delivery is
    /// put back): the consumer's count of deliveries being processed.
    pub async fn handle(
        &self,
        publisher: &Publisher,
        channel: Arc<Channel>,
        delivery: Delivery,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let ack = Ack::new(channel, &delivery, slot);
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
        if crate::observability::telemetry::otlp_enabled() {
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
            let arrived = Instant::now();
            metrics::command_received();
            metrics::in_flight(1.0);
            // Boxed, here and for the claim: a refund's future is as large
            // as its largest stage, and the compiler kept room for it twice
            // in this wrapper. Unboxed, each refund in flight took 18 KB all
            // along; boxed, 3 KB plus 5 KB in the box (7.5 more during the
            // claim). At prefetch 256 that took peak RSS from 61-64 to
            // 57 MiB.
            let inbound = Inbound {
                delivery: &delivery,
                ack: &ack,
            };
            let result = Box::pin(self.process(publisher, inbound)).await;
            metrics::in_flight(-1.0);
            match result {
                Ok(()) => self.ack(&delivery, &ack, arrived),
                Err(e) => {
                    error!(error = %e, "delivery not finished; putting it back");
                    metrics::delivery_failed(e.kind());
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

    /// Acks a delivery and measures it. Only [`Worker::handle`] acks, once
    /// `process` succeeded, so a delivery is acked once and never nacked
    /// after its ack.
    fn ack(&self, delivery: &Delivery, ack: &Ack, arrived: Instant) {
        match ack.send() {
            Ok(()) => {
                if let Some(published) = delivery.properties.timestamp() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    let took = (now - *published as f64).max(0.0);
                    metrics::end_to_end(Duration::from_secs_f64(took));
                }
                metrics::processing(arrived.elapsed());
            }
            // The channel is gone: the broker redelivers, and the record
            // turns the redelivery into a re-publication.
            Err(e) => warn!(error = %e, "ack failed; the message will be redelivered"),
        }
    }

    /// The stages in order; each returns early when it settled the delivery.
    async fn process(
        &self,
        publisher: &Publisher,
        inbound: Inbound<'_>,
    ) -> Result<(), PipelineError> {
        let delivery = inbound.delivery;
        let Some(command) = self.intake(publisher, delivery).await? else {
            return Ok(());
        };
        let _guard = self.locks.lock(&command.refund_id).await;
        let Some((provider, mut record, mut admitted)) =
            Box::pin(self.claim(publisher, delivery, &command)).await?
        else {
            return Ok(());
        };
        self.attempt(publisher, inbound, provider, &mut record, &mut admitted)
            .await
    }
}

/// A delivery and its ack (with its processing slot, which `finish` lets
/// go early).
#[derive(Clone, Copy)]
struct Inbound<'d> {
    delivery: &'d Delivery,
    ack: &'d Ack,
}

/// A delivery's ack, sent straight on the channel the delivery came from.
///
/// Not through `delivery.acker`: that hands each ack to lapin's internal
/// task, which then queues the frame and resolves the acker's promise once
/// the frame is written, two more task hand-offs per refund. And the write
/// is not waited for: an ack lost with its connection means a redelivery,
/// which the record answers (re-publishing the recorded event).
struct Ack {
    channel: Arc<Channel>,
    tag: DeliveryTag,
    /// The consumer's processing slot (see `app.rs`: the delivery after
    /// this one may already be here), let go once the outcome is written
    /// (`finish`) or with the ack.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl Ack {
    fn new(channel: Arc<Channel>, delivery: &Delivery, slot: Option<OwnedSemaphorePermit>) -> Self {
        Ack {
            channel,
            tag: delivery.delivery_tag,
            slot: std::sync::Mutex::new(slot),
        }
    }

    /// Lets the next delivery start: what is left of this one is the
    /// outcome's sync and the wait for its event's confirm, which the
    /// broker's window bounds.
    fn release_slot(&self) {
        drop(self.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Queues the ack frame.
    fn send(&self) -> Result<(), lapin::Error> {
        self.release_slot();
        // One poll queues the frame (or fails at once on a closed channel);
        // what is left is the wait for its write.
        match self
            .channel
            .basic_ack(self.tag, BasicAckOptions::default())
            .now_or_never()
        {
            Some(Err(e)) => Err(e),
            Some(Ok(())) | None => Ok(()),
        }
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
