//! The broker topology of the contract, declared by the worker at every
//! (re)connect. Declarations are idempotent as long as the arguments stay the
//! same, so a fresh broker needs no manual set-up and a running one is left
//! as it is.

use crate::config::AmqpSettings;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Declares exchanges, queues and bindings.
pub async fn declare(channel: &Channel, amqp: &AmqpSettings) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (&amqp.commands_exchange, ExchangeKind::Topic),
        (&amqp.events_exchange, ExchangeKind::Topic),
        (&amqp.dead_letter_exchange, ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(
                name.as_str().into(),
                kind,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .queue_declare(
            amqp.dead_letter_queue.as_str().into(),
            durable_queue,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            amqp.dead_letter_queue.as_str().into(),
            amqp.dead_letter_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            amqp.commands_queue.as_str().into(),
            durable_queue,
            commands_queue_arguments(amqp),
        )
        .await?;
    channel
        .queue_bind(
            amqp.commands_queue.as_str().into(),
            amqp.commands_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The commands queue dead-letters (rejections, expiries) to the
/// dead-letter exchange, so nothing it drops is lost.
pub fn commands_queue_arguments(amqp: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(amqp.dead_letter_exchange.as_str().into()),
    );
    args
}
