//! A small client for the public contract, used by the local run and handy
//! for operators: publish command files to the commands exchange (with
//! confirms) and tail outcome events.

use crate::values::secret::Secret;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use std::io::Write;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Broker error.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker did not take the message.
    #[error("the broker did not confirm the command")]
    NotConfirmed,
    /// A file could not be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Publishes each body as a persistent JSON command with routing key
/// `refund.<provider>` (from the body, when readable) and waits for the
/// broker's confirm.
pub async fn publish(url: &Secret, exchange: &str, bodies: &[Vec<u8>]) -> Result<(), ClientError> {
    let connection = crate::broker::connect(url, "refund-worker-publish").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for body in bodies {
        let provider = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.get("provider")
                    .and_then(|p| p.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into());
        let confirm = channel
            .basic_publish(
                exchange.into(),
                format!("refund.{provider}").as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err(ClientError::NotConfirmed);
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Declares the events exchange (as the worker does) and a temporary queue
/// bound to every event on it (`name` empty lets the broker name it), and
/// consumes it without acks.
pub async fn consume_events(
    channel: &lapin::Channel,
    exchange: &str,
    name: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    temporary_consumer(channel, exchange, name).await
}

/// A temporary queue (`name` empty lets the broker name it; it is then
/// exclusive) bound to everything on `exchange`, consumed without acks.
/// The exchange must exist.
pub async fn temporary_consumer(
    channel: &lapin::Channel,
    exchange: &str,
    name: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    let queue = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: name.is_empty(),
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Binds a temporary queue to the events exchange and prints every event
/// as one JSON line on stdout, until the connection ends or `limit` events
/// were printed.
pub async fn tail_events(
    url: &Secret,
    exchange: &str,
    limit: Option<usize>,
) -> Result<(), ClientError> {
    let connection = crate::broker::connect(url, "refund-worker-events").await?;
    let channel = connection.create_channel().await?;
    let mut consumer = consume_events(&channel, exchange, "").await?;
    eprintln!("listening for events on {exchange}");
    let mut printed = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{} {}",
            delivery.routing_key,
            String::from_utf8_lossy(&delivery.data)
        )?;
        out.flush()?;
        printed += 1;
        if limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    Ok(())
}
