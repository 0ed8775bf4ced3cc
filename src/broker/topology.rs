//! The broker topology of the contract, declared by the worker at every
//! (re)connect. Declarations are idempotent as long as the arguments stay the
//! same, so a fresh broker needs no manual set-up and a running one is left
//! as it is.

use crate::config::{AmqpSettings, Settings, StoreBackend};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Declares exchanges, queues and bindings.
pub async fn declare(channel: &Channel, settings: &Settings) -> Result<(), lapin::Error> {
    let amqp = &settings.amqp;
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
    let quorum = settings.store.backend == StoreBackend::Postgres;
    channel
        .queue_declare(
            amqp.dead_letter_queue.as_str().into(),
            durable_queue,
            replicated(FieldTable::default(), quorum),
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
            replicated(commands_queue_arguments(amqp), quorum),
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
    for (queue, delay_ms) in delay_queues(settings)
        .iter()
        .zip(&settings.retry.delayed_ms)
    {
        channel
            .queue_declare(
                queue.as_str().into(),
                durable_queue,
                replicated(delay_queue_arguments(amqp, *delay_ms), quorum),
            )
            .await?;
    }
    Ok(())
}

/// Replicas (the PostgreSQL backend): a quorum queue (replicated, survives
/// a node's loss), which competing consumers share. One
/// that dead-letters does so at least once (the default for quorum queues
/// is at most once, which can drop a waiting refund when a node is down),
/// which RabbitMQ allows only with `reject-publish` overflow.
pub fn replicated(mut args: FieldTable, quorum: bool) -> FieldTable {
    if !quorum {
        return args;
    }
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if args.inner().contains_key("x-dead-letter-exchange") {
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

/// The arguments the worker declares `queue` with (one of the topology's
/// queues; none for another name).
pub fn queue_arguments(settings: &Settings, queue: &str) -> FieldTable {
    let amqp = &settings.amqp;
    let quorum = settings.store.backend == StoreBackend::Postgres;
    if queue == amqp.commands_queue {
        return replicated(commands_queue_arguments(amqp), quorum);
    }
    let delay = delay_queues(settings)
        .into_iter()
        .zip(&settings.retry.delayed_ms)
        .find(|(name, _)| name == queue);
    match delay {
        Some((_, delay_ms)) => replicated(delay_queue_arguments(amqp, *delay_ms), quorum),
        None => replicated(FieldTable::default(), quorum),
    }
}

/// What to say when the broker has a queue of the other type (classic
/// where replicas need quorum queues, or the reverse).
pub fn queue_type_mismatch(settings: &Settings, error: &lapin::Error) -> String {
    match settings.store.backend {
        StoreBackend::Postgres => format!(
            "store.backend = \"postgres\" needs quorum queues, and the broker has classic ones \
             of these names ({error}): stop every worker and run `refund-worker queues to-quorum` \
             (docs/replicas.md, \"From one node to replicas\")"
        ),
        StoreBackend::Sled => format!(
            "the broker's queues are quorum queues ({error}), which store.backend = \"sled\" \
             does not declare: set store.backend = \"postgres\" (the replicas' mode), or use \
             other queue names"
        ),
    }
}

/// Names of the delay queues, one per `retry.delayed_ms` entry:
/// `<amqp.delay_queue_prefix>.<delay>` (e.g. `refunds.retry.30s`).
pub fn delay_queues(settings: &Settings) -> Vec<String> {
    settings
        .retry
        .delayed_ms
        .iter()
        .map(|ms| format!("{}.{}", settings.amqp.delay_queue_prefix, delay_label(*ms)))
        .collect()
}

fn delay_label(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// A delay queue holds a message for its TTL, then dead-letters it back to
/// the commands exchange: the retry waits in the broker, not in a consumer
/// slot. The routing key on the way back is fixed; the original one travels
/// in `x-refund-original-routing-key`.
fn delay_queue_arguments(amqp: &AmqpSettings, delay_ms: u64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(amqp.commands_exchange.as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("refund.retry".into()),
    );
    args
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

#[cfg(test)]
mod tests {
    use super::delay_label;

    #[test]
    fn delay_queue_names_are_readable() {
        assert_eq!(delay_label(5_000), "5s");
        assert_eq!(delay_label(30_000), "30s");
        assert_eq!(delay_label(300_000), "5m");
        assert_eq!(delay_label(7_200_000), "2h");
        assert_eq!(delay_label(1_500), "1500ms");
    }
}
