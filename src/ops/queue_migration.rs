//! `refund-worker queues to-quorum`: moving a single node's classic queues
//! to the quorum queues replicas need (store.backend = "postgres"), keeping
//! every message. RabbitMQ cannot change a queue's type, so each classic
//! queue (commands, dead letters, delay queues) is replaced:
//!
//! 1. a temporary quorum queue `<name>.to-quorum` is declared and bound
//!    where the queue is bound, so that what producers publish meanwhile
//!    lands there;
//! 2. every message moves to it (published with a confirm, then removed);
//! 3. the classic queue is deleted (only if empty) and declared again as a
//!    quorum queue with the worker's topology;
//! 4. the temporary queue is unbound and its messages move back, then it
//!    is deleted.
//!
//! Run it with every worker stopped. A message published by a producer
//! between steps 3 and 4 may reach both queues: its second copy is a
//! duplicate, which the store answers with the first one's outcome.

use crate::broker::topology;
use crate::config::{Settings, StoreBackend};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};

/// What a migration did, queue by queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Queues replaced by quorum queues, with the messages moved.
    pub moved: Vec<(String, usize)>,
    /// Queues that were quorum queues already.
    pub already: Vec<String>,
}

/// Why a migration stopped (what was done so far is safe: each message is
/// in exactly one of the two queues, or in both).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A broker error.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// A message was not confirmed; it stays where it was.
    #[error("a message of {0} was not confirmed where it was moved; it stays in {0}")]
    NotConfirmed(String),
}

/// Replaces every classic queue of the topology by a quorum queue.
pub async fn to_quorum(settings: &Settings) -> Result<Migrated, MigrationError> {
    let mut quorum = settings.clone();
    quorum.store.backend = StoreBackend::Postgres;
    let connection = crate::broker::connect_with(&settings.amqp, "refund-worker-migration").await?;
    let mut done = Migrated::default();
    let mut queues = vec![
        (
            settings.amqp.commands_queue.clone(),
            Some(settings.amqp.commands_exchange.clone()),
        ),
        (
            settings.amqp.dead_letter_queue.clone(),
            Some(settings.amqp.dead_letter_exchange.clone()),
        ),
    ];
    queues.extend(
        topology::delay_queues(settings)
            .into_iter()
            .map(|q| (q, None)),
    );
    for (queue, exchange) in queues {
        if is_quorum(&connection, &queue).await? {
            done.already.push(queue);
            continue;
        }
        let moved = replace(&connection, &queue, exchange.as_deref(), &quorum).await?;
        done.moved.push((queue, moved));
    }
    // The rest of the topology (bindings, exchanges) as replicas declare it.
    let channel = connection.create_channel().await?;
    topology::declare(&channel, &quorum).await?;
    let _ = connection.close(200, "migrated".into()).await;
    Ok(done)
}

/// Whether `queue` is a quorum queue (or absent: then the worker creates
/// it as one). A declaration with the quorum argument that the broker
/// refuses tells a classic queue; the refusal closes only a channel made
/// for the question.
async fn is_quorum(connection: &lapin::Connection, queue: &str) -> Result<bool, lapin::Error> {
    let probe = connection.create_channel().await?;
    let passive = probe
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    if passive.is_err() {
        return Ok(true);
    }
    let declared = probe
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: false,
                durable: true,
                ..Default::default()
            },
            quorum_arguments(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = probe.close(200, "probed".into()).await;
            Ok(true)
        }
        Err(e) if e.to_string().contains("inequivalent arg") => Ok(false),
        Err(e) => Err(e),
    }
}

fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// A confirm-mode channel.
async fn confirming(connection: &lapin::Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Steps 1–4 for one queue; returns the messages moved.
async fn replace(
    connection: &lapin::Connection,
    queue: &str,
    exchange: Option<&str>,
    quorum: &Settings,
) -> Result<usize, MigrationError> {
    let channel = &confirming(connection).await?;
    let temporary = format!("{queue}.to-quorum");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(temporary.as_str().into(), durable, quorum_arguments())
        .await?;
    if let Some(exchange) = exchange {
        channel
            .queue_bind(
                temporary.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let moved = move_all(channel, queue, &temporary).await?;
    channel
        .queue_delete(
            queue.into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await?;
    // A channel that used the classic queue keeps it in its cache under
    // the name: the quorum queue of the same name gets a channel of its own.
    let _ = channel.close(200, "classic queue deleted".into()).await;
    let channel = &confirming(connection).await?;
    channel
        .queue_declare(
            queue.into(),
            durable,
            topology::queue_arguments(quorum, queue),
        )
        .await?;
    if let Some(exchange) = exchange {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_unbind(
                temporary.as_str().into(),
                exchange.into(),
                "#".into(),
                FieldTable::default(),
            )
            .await?;
    }
    move_all(channel, &temporary, queue).await?;
    // Quorum queues refuse `if_empty`: it was emptied and nothing is
    // routed to it any more.
    let left = channel
        .queue_declare(
            temporary.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    if left > 0 {
        return Err(MigrationError::NotConfirmed(temporary));
    }
    channel
        .queue_delete(temporary.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(moved)
}

/// The message's properties without the header a quorum queue adds on
/// delivery (`x-delivery-count`): RabbitMQ 3.10 closes the connection on
/// a publish that carries it into a quorum queue.
fn without_broker_headers(properties: &lapin::BasicProperties) -> lapin::BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        if key.as_str() != "x-delivery-count" {
            kept.insert(key.clone(), value.clone());
        }
    }
    properties.clone().with_headers(kept)
}

/// Moves every message of `from` to `to`: each published (through the
/// default exchange) with a confirm, then removed.
async fn move_all(channel: &Channel, from: &str, to: &str) -> Result<usize, MigrationError> {
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(from.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        let delivery = message.delivery;
        let confirm = channel
            .basic_publish(
                "".into(),
                to.into(),
                BasicPublishOptions::default(),
                &delivery.data,
                without_broker_headers(&delivery.properties),
            )
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(_)) {
            return Err(MigrationError::NotConfirmed(from.to_string()));
        }
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        moved += 1;
    }
    Ok(moved)
}
