//! The worker's broker connections do their I/O on the async runtime (a
//! patched lapin: `vendor/lapin/PATCHES.md`), not on a thread of lapin's
//! own. Its own test binary, because it counts the process's threads and
//! another test's connection would start one.

mod support;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use support::broker::RabbitNode;

/// Threads of this process that carry the name of lapin's I/O thread.
fn lapin_io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("this process's threads")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "lapin-io-loop")
        })
        .count()
}

/// On a one-thread runtime, so that the connection's I/O has to share the
/// test's only thread: a loop that blocked it would hang the round trip.
#[tokio::test(flavor = "current_thread")]
async fn worker_connections_do_their_io_on_the_runtime() {
    let url = RabbitNode::shared().vhost();
    let store = tempfile::tempdir().expect("tempdir");
    let settings = support::test_settings(&url, store.path(), "http://127.0.0.1:9");
    let before = lapin_io_threads();

    let connection = refund_worker::broker::connect_with(&settings.amqp, "io-on-runtime")
        .await
        .expect("connect");
    assert_eq!(
        lapin_io_threads(),
        before,
        "the worker's connection started a lapin I/O thread"
    );

    // A round trip through the broker on it: 200 confirmed publishes, then
    // every message consumed and acked.
    const N: usize = 200;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .queue_declare(
            "io-on-runtime".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    for i in 0..N {
        let confirm = channel
            .basic_publish(
                "".into(),
                "io-on-runtime".into(),
                BasicPublishOptions::default(),
                format!("message {i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        assert!(
            matches!(confirm.await, Ok(Confirmation::Ack(None))),
            "publish {i} not confirmed"
        );
    }
    let mut consumer = channel
        .basic_consume(
            "io-on-runtime".into(),
            "io-check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..N {
        let delivery = tokio::time::timeout(support::WAIT, consumer.next())
            .await
            .expect("delivered in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.data, format!("message {i}").as_bytes());
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(lapin_io_threads(), before);

    // The control: lapin as published runs its loop on a thread of its own,
    // and the count above sees it.
    let plain = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("plain connection");
    assert_eq!(lapin_io_threads(), before + 1);
    let _ = plain.close(200, "done".into()).await;
    connection
        .close(200, "done".into())
        .await
        .expect("the worker's connection closes cleanly");
}
