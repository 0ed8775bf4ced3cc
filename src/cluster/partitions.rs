//! Owning partitions. A replica subscribes to the partition queues the
//! assignment gives it (`members.rs`); the queues have single active
//! consumer, so whatever the replicas' views, one consumer per partition
//! receives messages. A replica learns it is the active one from its first
//! delivery, and then, before handling anything, takes the partition over
//! in the state log (a marker, read back: `log.rs`).
//!
//! Giving a partition back (its preferred owner is alive again) is done
//! without a gap in ownership and without two owners at work: stop taking
//! deliveries, let the ones in flight finish and ack, then close the
//! channel; the broker then activates the next consumer, which appends its
//! own marker. Whatever this replica writes after that marker is ignored by
//! every reader, so even a replica that does not know it lost a partition
//! (a network partition) cannot change a refund the new owner decides.
//!
//! `amqp.prefetch` bounds the refunds in flight on the replica as a whole:
//! one semaphore for all partitions.

use super::forward::{Forwarder, CONTROL_HEADER, MAC_HEADER};
use super::log::StateLog;
use super::router::{forward, partition_of_body};
use super::{partition_queue, ClusterError};
use crate::broker::publisher::Publisher;
use crate::store::journal::Journal;
use crate::worker::Worker;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::AMQPValue;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use lapin::{Channel, Connection};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

/// What every partition consumer shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The pipeline (in an `Arc`: cloned for every delivery).
    pub worker: Arc<Worker>,
    /// The session's confirmed publisher (likewise).
    pub publisher: Arc<Publisher>,
    /// The state log.
    pub log: StateLog,
    /// The store's journal.
    pub journal: Arc<Journal>,
    /// Slots for refunds in flight on this replica (`amqp.prefetch`).
    pub slots: Arc<Semaphore>,
    /// Numbers ownership tokens.
    pub counter: Arc<AtomicU64>,
    /// `amqp.commands_queue`, the prefix of the partition queues.
    pub queue_prefix: String,
    /// `amqp.prefetch`.
    pub prefetch: u16,
    /// Confirm timeout.
    pub timeout: Duration,
    /// Runs requests forwarded to this partition's owner.
    pub forwarder: Arc<Forwarder>,
    /// `cluster.resubscribe_idle_ms`: how long a consumer with nothing in
    /// flight waits for a delivery before it closes its channel and
    /// subscribes again. A quorum queue can, after a leader election, count
    /// a message as delivered to a consumer that never received it
    /// (rabbitmq-server#15473); such a message comes back only when the
    /// consumer's channel closes. Resubscribing when idle bounds how long a
    /// refund can wait that way.
    pub resubscribe_idle: Duration,
}

/// What a partition consumer is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// Consume.
    Run,
    /// Hand the partition to the next owner (balance, shutdown).
    GiveBack,
    /// The session is gone: stop at once, keep the token (see below).
    Leave,
}

/// A running partition consumer.
#[derive(Debug)]
pub struct Owned {
    give_back: watch::Sender<Ask>,
    task: tokio::task::JoinHandle<Result<(), ClusterError>>,
}

impl Owned {
    /// Subscribes to partition `p`'s queue.
    pub async fn start(
        connection: &Connection,
        shared: Shared,
        p: u32,
    ) -> Result<Self, ClusterError> {
        let (give_back, asked) = watch::channel(Ask::Run);
        let channel = connection.create_channel().await?;
        let task =
            tokio::spawn(consume(channel, shared, p, asked).instrument(info_span!("partition", p)));
        Ok(Owned { give_back, task })
    }

    /// Asks the consumer to give the partition back (see the module doc).
    pub fn give_back(&self) {
        let _ = self.give_back.send(Ask::GiveBack);
    }

    /// The broker session is gone: stop now without waiting for the
    /// refunds in flight (they finish on their own, through the next
    /// session's log) and keep the ownership token.
    pub fn leave(&self) {
        let _ = self.give_back.send(Ask::Leave);
    }

    /// Whether the consumer stopped (given back, or failed).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the consumer's end and its result.
    pub async fn join(self) -> Result<(), ClusterError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ClusterError::Log(format!("partition task: {e}"))),
        }
    }
}

async fn consume(
    channel: Channel,
    shared: Shared,
    p: u32,
    mut asked: watch::Receiver<Ask>,
) -> Result<(), ClusterError> {
    // Shared by this partition's deliveries (each acks on it).
    let channel = Arc::new(channel);
    channel
        .basic_qos(shared.prefetch, BasicQosOptions::default())
        .await?;
    let queue = partition_queue(&shared.queue_prefix, p);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("p{p}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let running = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let mut idle_at = tokio::time::Instant::now() + shared.resubscribe_idle;
    let mut idle = false;
    let result = loop {
        let delivery = tokio::select! {
            _ = asked.wait_for(|asked| *asked != Ask::Run) => break Ok(()),
            _ = tokio::time::sleep_until(idle_at) => {
                if running.load(Ordering::SeqCst) == 0 {
                    idle = true;
                    break Ok(());
                }
                idle_at = tokio::time::Instant::now() + shared.resubscribe_idle;
                continue;
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => break Err(e.into()),
                None => break Err(ClusterError::Log(format!("the consumer of {queue} was cancelled"))),
            },
        };
        idle_at = tokio::time::Instant::now() + shared.resubscribe_idle;
        if !shared.journal.holds(p) {
            // The first delivery: this replica is the active consumer.
            let n = shared.counter.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = shared.log.acquire(p, shared.journal.partitions(), n).await {
                break Err(e);
            }
            info!(partition = p, "partition taken over");
        }
        if let Some(mac) = control(&delivery) {
            // A request forwarded to this partition's owner (a callback,
            // an operator decision): run it, answer, ack.
            let (forwarder, channel) = (shared.forwarder.clone(), shared.publisher.channel());
            running.fetch_add(1, Ordering::SeqCst);
            let (running, done) = (running.clone(), done.clone());
            tokio::spawn(async move {
                let answer = forwarder.run(&delivery.data, mac.as_deref()).await;
                if let Some(reply_to) = delivery.properties.reply_to() {
                    let mut properties = BasicProperties::default();
                    if let Some(id) = delivery.properties.correlation_id() {
                        properties = properties.with_correlation_id(id.clone());
                    }
                    let body = serde_json::to_vec(&answer).unwrap_or_default();
                    let _ = channel
                        .basic_publish(
                            "".into(),
                            reply_to.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            properties,
                        )
                        .await;
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                running.fetch_sub(1, Ordering::SeqCst);
                done.notify_waiters();
            });
            continue;
        }
        let target = partition_of_body(&delivery.data, shared.journal.partitions());
        if target != p {
            // Never processed here: moved to where its other copies go.
            warn!(
                partition = p,
                target, "command in the wrong partition; moving it"
            );
            let channel = shared.publisher.channel();
            match forward(
                &channel,
                &shared.queue_prefix,
                target,
                &delivery,
                shared.timeout,
            )
            .await
            {
                Ok(()) => {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                Err(e) => break Err(e),
            }
            continue;
        }
        let slot = tokio::select! {
            _ = asked.wait_for(|asked| *asked != Ask::Run) => break Ok(()),
            slot = shared.slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(()),
            },
        };
        running.fetch_add(1, Ordering::SeqCst);
        let (worker, publisher) = (shared.worker.clone(), shared.publisher.clone());
        let (running, done, channel) = (running.clone(), done.clone(), channel.clone());
        tokio::spawn(async move {
            worker.handle(&publisher, channel, delivery, None).await;
            drop(slot);
            running.fetch_sub(1, Ordering::SeqCst);
            done.notify_waiters();
        });
    };
    // Let the refunds in flight finish and ack on this channel, then close
    // it: deliveries received but not started go back to the queue, and the
    // broker activates the next consumer.
    if idle {
        // Nothing in flight: closing the channel hands back whatever the
        // queue thinks this consumer holds; the session subscribes again at
        // its next tick and keeps the token (no new marker unless another
        // replica took the partition meanwhile).
        debug!(partition = p, "idle: subscribing again");
        let _ = channel.close(200, "idle; subscribing again".into()).await;
        return result;
    }
    if *asked.borrow() == Ask::Leave || result.is_err() {
        // After a broker failure the token is kept: if nobody took the
        // partition meanwhile, the refunds that were in flight finish with
        // it through the next session (the log decides: `store/journal.rs`).
        return result;
    }
    let deadline = tokio::time::Instant::now() + crate::app::DRAIN_DEADLINE;
    while running.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(50), done.notified()).await;
    }
    {
        // Given back: the next owner appends its marker.
        shared.journal.disown(p);
        info!(partition = p, "partition released");
    }
    let _ = channel.close(200, "partition given back".into()).await;
    result
}

/// `Some(mac)` when the delivery is a forwarded request (see
/// `forward.rs`); the MAC is absent when no operator token is configured.
fn control(delivery: &lapin::message::Delivery) -> Option<Option<String>> {
    let headers = delivery.properties.headers().as_ref()?;
    headers.inner().get(CONTROL_HEADER)?;
    Some(match headers.inner().get(MAC_HEADER) {
        Some(AMQPValue::LongString(mac)) => Some(mac.to_string()),
        _ => None,
    })
}
