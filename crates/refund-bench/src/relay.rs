//! The baseline relay: the least a durable queue worker can do on this
//! broker. Same prefetch, same durability as the worker (manual ack, a
//! small persistent event published with confirms, ack after the confirm,
//! many in flight), and nothing else: no store, no HTTP.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use refund_worker::config::AmqpSettings;

/// Relays `n` commands from the commands queue to events.
pub async fn run(amqp_url: String, amqp: AmqpSettings, n: usize) -> Result<(), lapin::Error> {
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(amqp.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            amqp.commands_queue.as_str().into(),
            "relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut taken = 0;
    while taken < n {
        let Some(delivery) = deliveries.next().await else {
            break;
        };
        let delivery = delivery?;
        taken += 1;
        let publish = publish.clone();
        let exchange = amqp.events_exchange.clone();
        tasks.spawn(async move {
            let command: serde_json::Value =
                serde_json::from_slice(&delivery.data).unwrap_or_default();
            let event = serde_json::json!({
                "refund_id": command["refund_id"],
                "status": "succeeded",
                "published_us": command["metadata"]["published_us"],
            })
            .to_string();
            let confirmed = match publish
                .basic_publish(
                    exchange.as_str().into(),
                    "refund.succeeded".into(),
                    BasicPublishOptions::default(),
                    event.as_bytes(),
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
            {
                Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(_))),
                Err(_) => false,
            };
            if confirmed {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let _ = connection.close(200, "relay done".into()).await;
    Ok(())
}
