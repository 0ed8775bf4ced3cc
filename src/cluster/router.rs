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
use lapin::{BasicProperties, Channel, Confirmation};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, warn};

/// The partition a command body belongs to (0 when it has no readable
/// `refund_id`: the pipeline there dead-letters it).
pub fn partition_of_body(body: &[u8], partitions: u32) -> u32 {
    match refund_id_of(body) {
        Some(id) => partition_of(&id, partitions),
        None => 0,
    }
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
    let command = Command {
        data: delivery.data.clone(),
        properties: delivery.properties.clone(),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
    };
    forward_command(channel, queue_prefix, p, &command, timeout).await
}

/// A command as it came from the commands queue.
#[derive(Debug, Clone)]
struct Command {
    data: Vec<u8>,
    properties: BasicProperties,
    exchange: String,
    routing_key: String,
}

async fn forward_command(
    channel: &Channel,
    queue_prefix: &str,
    p: u32,
    command: &Command,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let mut headers = command.properties.headers().clone().unwrap_or_default();
    if !headers.inner().contains_key(HEADER_ORIGINAL_EXCHANGE) {
        headers.insert(
            HEADER_ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString(command.exchange.as_str().into()),
        );
        headers.insert(
            HEADER_ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString(command.routing_key.as_str().into()),
        );
    }
    let properties = command
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
            &command.data,
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

/// How long after a broker session starts the router double-checks its
/// moves, and how long after a move it looks.
pub const RECHECK_WINDOW: Duration = Duration::from_secs(60);
const RECHECK_AFTER: Duration = Duration::from_secs(15);

/// Moves made while the broker may be failing over, to be checked once more.
///
/// Why: right after a broker node died, while a partition queue elects a
/// new leader, RabbitMQ 3.10 was seen to confirm a move that the queue then
/// did not have (the cluster test lost one command in about seven runs,
/// always moves made right after a node died, before the queue's election
/// ended; broker logs in `docs/replicas.md`). So a move made within
/// [`RECHECK_WINDOW`] of the session's start, or of a move a partition
/// queue refused (the sign of an election), is checked [`RECHECK_AFTER`]
/// later: if no replica has a record of the refund by
/// then, the command is moved again. A copy that was not lost meets the
/// other one in the partition and is answered from the record, so the cost
/// of a needless second move is one more identical event (or one more
/// `rejected` event for a command that is rejected without a record). It
/// lives with the replica, across sessions; a replica that dies takes its
/// list along (the window is a minute).
#[derive(Debug, Default)]
pub struct Recheck {
    moves: Mutex<VecDeque<Moved>>,
}

#[derive(Debug)]
struct Moved {
    due: Instant,
    refund_id: String,
    p: u32,
    command: Command,
    tries: u32,
}

impl Recheck {
    fn push(&self, moved: Moved) {
        self.moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(moved);
    }

    fn take_due(&self, now: Instant) -> Vec<Moved> {
        let mut moves = self.moves.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        while moves.front().is_some_and(|m| m.due <= now) {
            due.extend(moves.pop_front());
        }
        due
    }

    /// Moves waiting for their check (for tests and readiness).
    pub fn len(&self) -> usize {
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no move waits for its check.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks the moves that are due (see [`Recheck`]): moves again those whose
/// refund no replica has a record of.
async fn recheck_due(
    recheck: &Recheck,
    store: &Store,
    channel: &Channel,
    queue_prefix: &str,
    timeout: Duration,
) {
    for mut moved in recheck.take_due(Instant::now()) {
        match store.get(&moved.refund_id) {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                warn!(refund_id = moved.refund_id.as_str(), error = %e, "recheck: store read failed; moving the command again")
            }
        }
        match forward_command(channel, queue_prefix, moved.p, &moved.command, timeout).await {
            Ok(()) => warn!(
                refund_id = moved.refund_id.as_str(),
                partition = moved.p,
                "no record {}s after the command was moved (during a broker failover); moved it again",
                RECHECK_AFTER.as_secs()
            ),
            Err(e) if moved.tries < 5 => {
                warn!(refund_id = moved.refund_id.as_str(), error = %e, "recheck: moving again failed; trying later");
                moved.tries += 1;
                moved.due = Instant::now() + Duration::from_secs(5);
                recheck.push(moved);
            }
            Err(e) => error!(
                refund_id = moved.refund_id.as_str(),
                error = %e,
                "recheck: could not move the command again; if no outcome event arrives, publish it again"
            ),
        }
    }
}

/// What the router double-checks, and until when (see [`Recheck`]).
#[derive(Debug, Clone)]
pub struct Checks {
    /// The replica's list of moves to check.
    pub recheck: Arc<Recheck>,
    /// Where records are found (every replica's sled has every record).
    pub store: Store,
    /// Moves made before this instant are checked.
    until: Arc<Mutex<Instant>>,
}

impl Checks {
    /// Checks for moves made in the first [`RECHECK_WINDOW`] of a session
    /// and in the [`RECHECK_WINDOW`] after any move a partition queue did
    /// not take (a nack or no confirm: a queue is electing a leader, and
    /// its neighbours may be too).
    pub fn for_session(recheck: Arc<Recheck>, store: Store) -> Self {
        Checks {
            recheck,
            store,
            until: Arc::new(Mutex::new(Instant::now() + RECHECK_WINDOW)),
        }
    }

    fn checking(&self, now: Instant) -> bool {
        now < *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn turbulence(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + RECHECK_WINDOW;
    }
}

/// Consumes the commands queue and moves every command to its partition,
/// until the channel fails (an error) or it has been idle for
/// `resubscribe_idle` with nothing in flight (`Ok`: run it again with a
/// fresh `consume` channel).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    consume: Channel,
    publish: Channel,
    commands_queue: String,
    partitions: u32,
    prefetch: u16,
    timeout: Duration,
    resubscribe_idle: Duration,
    checks: Checks,
) -> Result<(), ClusterError> {
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
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
    let mut recheck_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(_) = moving.join_next(), if !moving.is_empty() => {}
            _ = recheck_tick.tick(), if !checks.recheck.is_empty() => {
                recheck_due(&checks.recheck, &checks.store, &publish, &commands_queue, timeout).await;
            }
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
                    let id = refund_id_of(&delivery.data);
                    let refund_id = id.as_deref().unwrap_or_default();
                    let p = partition_of_body(&delivery.data, partitions);
                    match forward(&publish, &prefix, p, &delivery, timeout).await {
                        Ok(()) => {
                            debug!(refund_id, partition = p, redelivered = delivery.redelivered, "command moved to its partition");
                            let now = Instant::now();
                            if let (Some(refund_id), true) = (id.clone(), checks.checking(now)) {
                                checks.recheck.push(Moved {
                                    due: now + RECHECK_AFTER,
                                    refund_id,
                                    p,
                                    command: Command {
                                        data: delivery.data.clone(),
                                        properties: delivery.properties.clone(),
                                        exchange: delivery.exchange.to_string(),
                                        routing_key: delivery.routing_key.to_string(),
                                    },
                                    tries: 0,
                                });
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
    fn rechecks_come_due_in_order() {
        let recheck = Recheck::default();
        let now = Instant::now();
        for (i, after) in [0u64, 1, 30].into_iter().enumerate() {
            recheck.push(Moved {
                due: now + Duration::from_secs(after),
                refund_id: format!("r{i}"),
                p: 0,
                command: Command {
                    data: Vec::new(),
                    properties: BasicProperties::default(),
                    exchange: String::new(),
                    routing_key: String::new(),
                },
                tries: 0,
            });
        }
        let due: Vec<String> = recheck
            .take_due(now + Duration::from_secs(2))
            .into_iter()
            .map(|m| m.refund_id)
            .collect();
        assert_eq!(due, ["r0", "r1"]);
        assert_eq!(recheck.len(), 1);
    }

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
