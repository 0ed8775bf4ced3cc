//! Intake in cluster mode: every replica consumes `amqp.commands_queue`
//! (competing consumers) and moves each command to its partition queue,
//! `<amqp.commands_queue>.p.<partition of refund_id>`: publish with confirm,
//! then ack. Publishers keep today's contract (any routing key, no new
//! property); every copy of a refund, late duplicates, delay-queue returns
//! and replays included, meets the others in one partition, where one owner
//! decides.
//!
//! A body without a readable `refund_id` goes to partition 0, whose
//! pipeline dead-letters it with the usual reason (it is never lost here).

use super::{partition_queue, ClusterError};
use crate::broker::{HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_ROUTING_KEY};
use crate::store::journal::partition_of;
use crate::store::Store;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// The partition a command body belongs to (0 when it has no readable
/// `refund_id`: the pipeline there dead-letters it).
pub fn partition_of_body(body: &[u8], partitions: u32) -> u32 {
    partition_for(refund_id_of(body).as_deref(), partitions)
}

/// The partition of a body's `refund_id` as [`refund_id_of`] read it.
fn partition_for(refund_id: Option<&str>, partitions: u32) -> u32 {
    refund_id.map_or(0, |id| partition_of(id, partitions))
}

/// The body's `refund_id`, when it has a readable, non-blank one.
fn refund_id_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        refund_id: String,
    }
    serde_json::from_slice::<Id>(body)
        .ok()
        .map(|id| id.refund_id)
        .filter(|id| !id.trim().is_empty())
}

/// Publishes `delivery` to partition `p`'s queue (with confirm), keeping
/// its properties and recording where it was first published.
pub async fn forward(
    channel: &Channel,
    queue_prefix: &str,
    p: u32,
    delivery: &Delivery,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    if !headers.inner().contains_key(HEADER_ORIGINAL_EXCHANGE) {
        headers.insert(
            HEADER_ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString(delivery.exchange.as_str().into()),
        );
        headers.insert(
            HEADER_ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
    }
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let queue = partition_queue(queue_prefix, p);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &delivery.data,
            properties,
        )
        .await?;
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err(ClusterError::Log(format!(
            "no confirm moving a command to {queue}"
        ))),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(_)) => Err(ClusterError::Log(format!("{queue} did not take a command"))),
    }
}

/// How long after a sign of a broker failover (a reconnect, a move a
/// partition queue refused) the router double-checks its moves, and how
/// long after a move it looks.
pub const RECHECK_WINDOW: Duration = Duration::from_secs(60);
const RECHECK_AFTER: Duration = Duration::from_secs(10);

/// The router's prefetch: at most this many commands wait for their check
/// (see [`Checks`]); outside a check window a command is acked as soon as
/// it is moved, so this only sizes a buffer.
const ROUTER_PREFETCH: u16 = 5000;

/// When the router double-checks its moves.
///
/// Why: right after a broker node died, while a partition queue elected a
/// new leader, RabbitMQ 3.10.8 was seen to confirm moves into that queue
/// that it then did not have: no queue held them and no replica ever saw
/// them (the cluster test lost a command in about one run of seven; broker
/// logs and timings in `docs/replicas.md`). So within [`RECHECK_WINDOW`]
/// of a reconnect or of a move a partition queue refused (the sign of an
/// election), the router does not ack a command when its move is
/// confirmed: it looks again [`RECHECK_AFTER`] later, acks it if a replica
/// has a record of the refund by then, and otherwise puts it back in the
/// commands queue to be moved again. The original stays in the broker
/// until then, so a router that dies meanwhile loses nothing: the broker
/// hands the command to another router. A needless second move (the
/// partition was slow to claim it) costs one more identical event, or one
/// more `rejected` event for a command rejected without a record.
#[derive(Debug, Clone)]
pub struct Checks {
    /// Where records are found (every replica's sled has every record).
    store: Store,
    /// Moves made before this instant are checked.
    until: Arc<Mutex<Instant>>,
}

impl Checks {
    /// Checks moves made before `until` (a reconnect's first
    /// [`RECHECK_WINDOW`]; the session's start at a replica's first
    /// session), and in the [`RECHECK_WINDOW`] after any refused move.
    pub fn until(store: Store, until: Instant) -> Self {
        Checks {
            store,
            until: Arc::new(Mutex::new(until)),
        }
    }

    fn checking(&self, now: Instant) -> bool {
        now < *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn turbulence(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + RECHECK_WINDOW;
    }

    /// Whether a replica has a record of `refund_id` (a store that cannot
    /// be read counts as "no": the command is moved again).
    fn recorded(&self, refund_id: &str) -> bool {
        matches!(self.store.get(refund_id), Ok(Some(_)))
    }
}

/// Consumes the commands queue and moves every command to its partition,
/// until the channel fails (an error) or it has been idle for
/// `resubscribe_idle` with nothing in flight (`Ok`: run it again with a
/// fresh `consume` channel).
pub async fn run(
    consume: Channel,
    publish: Channel,
    commands_queue: String,
    partitions: u32,
    timeout: Duration,
    resubscribe_idle: Duration,
    checks: Checks,
) -> Result<(), ClusterError> {
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    consume
        .basic_qos(ROUTER_PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            commands_queue.as_str().into(),
            "router".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut moving = tokio::task::JoinSet::new();
    let mut idle_at = tokio::time::Instant::now() + resubscribe_idle;
    loop {
        tokio::select! {
            Some(_) = moving.join_next(), if !moving.is_empty() => {}
            _ = tokio::time::sleep_until(idle_at) => {
                if moving.is_empty() {
                    // See `partitions::Shared::resubscribe_idle`: the
                    // session starts a router on a fresh channel.
                    // The publishing channel stays (it holds nothing).
                    let _ = consume.close(200, "idle; subscribing again".into()).await;
                    return Ok(());
                }
                idle_at = tokio::time::Instant::now() + resubscribe_idle;
            }
            next = consumer.next() => {
                let Some(delivery) = next else {
                    return Err(ClusterError::Log("the router's consumer was cancelled".into()));
                };
                let delivery = delivery?;
                idle_at = tokio::time::Instant::now() + resubscribe_idle;
                let publish = publish.clone();
                let prefix = commands_queue.clone();
                let checks = checks.clone();
                moving.spawn(async move {
                    // One parse of the body: the id names the partition.
                    let id = refund_id_of(&delivery.data);
                    let refund_id = id.as_deref().unwrap_or_default();
                    let p = partition_for(id.as_deref(), partitions);
                    match forward(&publish, &prefix, p, &delivery, timeout).await {
                        Ok(()) => {
                            debug!(refund_id, partition = p, redelivered = delivery.redelivered, "command moved to its partition");
                            if let (Some(refund_id), true) = (id.as_deref(), checks.checking(Instant::now())) {
                                tokio::time::sleep(RECHECK_AFTER).await;
                                if !checks.recorded(refund_id) {
                                    warn!(refund_id, partition = p, "no record {}s after the command was moved (during a broker failover); moving it again", RECHECK_AFTER.as_secs());
                                    let _ = delivery
                                        .acker
                                        .nack(BasicNackOptions { requeue: true, ..Default::default() })
                                        .await;
                                    return;
                                }
                            }
                            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                                // Redelivered and moved again: the copies
                                // meet in the partition.
                                warn!(refund_id, error = %e, "moved, but the ack failed");
                            }
                        }
                        Err(e) => {
                            checks.turbulence();
                            warn!(refund_id, error = %e, partition = p, "command not moved to its partition; it goes back to the queue");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = delivery
                                .acker
                                .nack(BasicNackOptions { requeue: true, ..Default::default() })
                                .await;
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_without_a_refund_id_go_to_partition_zero() {
        assert_eq!(partition_of_body(b"not json", 16), 0);
        assert_eq!(partition_of_body(br#"{"refund_id":""}"#, 16), 0);
        assert_eq!(
            partition_of_body(br#"{"refund_id":"r-7","provider":"x"}"#, 16),
            partition_of("r-7", 16)
        );
    }
}
