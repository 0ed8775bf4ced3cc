//! Fencing by log order on a real RabbitMQ stream, without the timing luck
//! a process test needs: two replicas' stores in one process, each with
//! its own connection, appender and tailer on the same state log.
//!
//! Replica A owns a partition and makes `attempting` durable for a refund;
//! replica B takes the partition over; A, not knowing, writes the outcome.
//! A's sync must fail (fenced) and neither replica's store may ever show
//! A's late write, while both show the `attempting` that came before B's
//! marker: the state B decides from is exactly the log up to its marker.

mod support;

use lapin::{Connection, ConnectionProperties};
use refund_worker::cluster::log;
use refund_worker::command::RefundCommand;
use refund_worker::event::{OutcomeEvent, Status};
use refund_worker::store::journal::Journal;
use refund_worker::store::ledger::LedgerChange;
use refund_worker::store::{Claim, RefundRecord, RefundState, Store, StoreError};
use std::time::Duration;
use support::broker::RabbitNode;

const PARTITIONS: u32 = 4;

struct Replica {
    store: Store,
    log: log::StateLog,
    _connection: Connection,
    _tasks: tokio::task::JoinSet<Result<(), refund_worker::cluster::ClusterError>>,
    _dir: tempfile::TempDir,
}

async fn replica(url: &str, name: &str) -> Replica {
    let dir = tempfile::tempdir().expect("dir");
    let journal = Journal::new(PARTITIONS, Duration::from_secs(5));
    let store = Store::open_replicated(dir.path(), journal, 8 << 20).expect("store");
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut stream = lapin::types::FieldTable::default();
    stream.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("stream".into()),
    );
    channel
        .queue_declare(
            "test.state".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            stream,
        )
        .await
        .expect("stream");
    let mut tasks = tokio::task::JoinSet::new();
    let log = log::start(
        &connection,
        "test.state",
        &store,
        name,
        &format!("{name}-instance"),
        Duration::from_secs(5),
        &mut tasks,
    )
    .await
    .expect("log");
    log.catch_up(PARTITIONS).await.expect("caught up");
    Replica {
        store,
        log,
        _connection: connection,
        _tasks: tasks,
        _dir: dir,
    }
}

fn command(id: &str) -> RefundCommand {
    RefundCommand::parse(
        format!(r#"{{"refund_id":"{id}","provider":"hyp_pay","transaction":{{"id":"1"}}}}"#)
            .as_bytes(),
    )
    .expect("command")
}

fn state_of(store: &Store, id: &str) -> Option<String> {
    store
        .get(id)
        .expect("read")
        .map(|r| r.state.name().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_partition_cannot_write_it() {
    let url = tokio::task::spawn_blocking(|| RabbitNode::shared().vhost())
        .await
        .expect("vhost");
    let a = replica(&url, "replica-a").await;
    let b = replica(&url, "replica-b").await;
    let refund = "rf-fenced-1";
    let journal = a.store.journal().expect("cluster store").clone();
    let p = journal.partition_of(refund);

    // A owns p and makes `attempting` durable.
    a.log.acquire(p, PARTITIONS, 1).await.expect("A takes p");
    let mut record = RefundRecord::attempting(&command(refund));
    assert_eq!(a.store.claim(&record).expect("claim"), Claim::Claimed);
    a.store
        .sync_refund(refund)
        .await
        .expect("attempting durable");

    // B takes p over: it reads the log up to its marker first, so it knows.
    b.log.acquire(p, PARTITIONS, 1).await.expect("B takes p");
    assert_eq!(state_of(&b.store, refund).as_deref(), Some("attempting"));

    // A, unaware, records an outcome: its sync fails, nothing lands.
    let event = OutcomeEvent::new(refund, Status::Succeeded, &Default::default(), 1);
    record.state = RefundState::Finished { event };
    a.store
        .commit(&record, LedgerChange::Keep)
        .expect("written locally");
    match a.store.sync_refund(refund).await {
        Err(StoreError::Fenced { partition }) => assert_eq!(partition, p),
        other => panic!("A's late write was not fenced: {other:?}"),
    }
    // Give the tailers time to read A's late batch, then look: both stores
    // hold the log's truth, `attempting`, never A's outcome.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(&a.store, refund).as_deref(), Some("attempting"));
    assert_eq!(state_of(&b.store, refund).as_deref(), Some("attempting"));

    // B's own writes are valid: it decides the refund.
    let mut decided = b.store.get(refund).expect("read").expect("record");
    decided.state = RefundState::InDoubt {
        event: OutcomeEvent::new(refund, Status::InDoubt, &Default::default(), 1),
    };
    b.store
        .commit(&decided, LedgerChange::Keep)
        .expect("written");
    b.store.sync_refund(refund).await.expect("B holds p");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(&a.store, refund).as_deref(), Some("in_doubt"));
}
