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
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use std::time::Duration;
use tracing::warn;

/// The partition a command body belongs to (0 when it has no readable
/// `refund_id`: the pipeline there dead-letters it).
pub fn partition_of_body(body: &[u8], partitions: u32) -> u32 {
    #[derive(serde::Deserialize)]
    struct Id {
        refund_id: String,
    }
    match serde_json::from_slice::<Id>(body) {
        Ok(id) if !id.refund_id.trim().is_empty() => partition_of(&id.refund_id, partitions),
        _ => 0,
    }
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

/// Consumes the commands queue and moves every command to its partition,
/// until the channel fails (an error) or it has been idle for
/// `resubscribe_idle` with nothing in flight (`Ok`: run it again on
/// fresh channels).
pub async fn run(
    consume: Channel,
    publish: Channel,
    commands_queue: String,
    partitions: u32,
    prefetch: u16,
    timeout: Duration,
    resubscribe_idle: Duration,
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
    loop {
        tokio::select! {
            Some(_) = moving.join_next(), if !moving.is_empty() => {}
            _ = tokio::time::sleep_until(idle_at) => {
                if moving.is_empty() {
                    // See `partitions::Shared::resubscribe_idle`: the
                    // session starts a router on fresh channels.
                    let _ = consume.close(200, "idle; subscribing again".into()).await;
                    let _ = publish.close(200, "idle; subscribing again".into()).await;
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
                moving.spawn(async move {
                    let p = partition_of_body(&delivery.data, partitions);
                    match forward(&publish, &prefix, p, &delivery, timeout).await {
                        Ok(()) => {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        }
                        Err(e) => {
                            warn!(error = %e, partition = p, "command not moved to its partition; it goes back to the queue");
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
