//! Cluster mode (`cluster.enabled`): several replicas of one deployment on
//! a RabbitMQ cluster, each refund decided by one owner from one state.
//!
//! ```text
//! refunds.commands ──router (every replica)──▶ refunds.commands.p.<k>   k = fnv1a(refund_id) mod P
//!   (quorum)                                     (quorum, single active consumer)
//!                                                      │ the owner of k only
//!                                                      ▼
//!                                              the usual pipeline (worker/)
//!                                                      │ every store write
//!                                                      ▼
//!                     refunds.commands.state (stream): appended, read back by every replica into its sled
//! ```
//!
//! Module map: `router.rs` (commands → partitions), `members.rs`
//! (heartbeats, who owns what), `partitions.rs` (consuming, taking over
//! and giving back a partition), `log.rs` (the state log: appender,
//! tailer, markers). The store's half is `store/journal.rs`.
//! `docs/replicas.md` has the reasoning; the README the guarantees.

pub mod forward;
pub mod log;
pub mod members;
pub mod partitions;
pub mod router;

use crate::broker::publisher::Publisher;
use crate::broker::{self, topology};
use crate::config::Settings;
use crate::http::Health;
use crate::shutdown::Shutdown;
use crate::worker::Worker;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use members::{Heartbeat, Members};
use partitions::{Owned, Shared};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Cluster failures.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The broker failed (the session ends and reconnects).
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The state log failed (the session ends and reconnects).
    #[error("state log: {0}")]
    Log(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// This replica must not run (a configuration conflict); start-up stops.
    #[error("{0}")]
    Refused(String),
}

/// Partition `p`'s queue.
pub fn partition_queue(prefix: &str, p: u32) -> String {
    format!("{prefix}.p.{p}")
}

/// The state log's stream.
pub fn state_stream(settings: &Settings) -> String {
    format!("{}.state", settings.amqp.commands_queue)
}

/// The heartbeat exchange.
pub fn heartbeat_exchange(settings: &Settings) -> String {
    format!("{}.cluster", settings.amqp.commands_queue)
}

/// Declares what cluster mode adds to the topology: the partition queues,
/// the state stream and the heartbeat exchange. (The contract's queues are
/// quorum queues in cluster mode: `broker/topology.rs`.) A failed passive
/// declaration closes its channel, hence the connection.
pub async fn declare(
    connection: &lapin::Connection,
    settings: &Settings,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for p in 0..partitions(settings) {
        let mut args = FieldTable::default();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(settings.amqp.dead_letter_exchange.as_str().into()),
        );
        let queue = partition_queue(&settings.amqp.commands_queue, p);
        channel
            .queue_declare(
                queue.as_str().into(),
                durable,
                topology::replicated(args, true),
            )
            .await?;
    }
    channel
        .exchange_declare(
            heartbeat_exchange(settings).as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    // A stream's arguments (its retention) cannot change once it exists:
    // an existing one is used as it is, whatever `store.tombstone_retention`
    // says now.
    let name = state_stream(settings);
    let probe = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..durable
    };
    if probe
        .queue_declare(name.as_str().into(), passive, FieldTable::default())
        .await
        .is_ok()
    {
        let _ = probe.close(200, "stream exists".into()).await;
        return Ok(());
    }
    let mut stream = FieldTable::default();
    stream.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    // The log must outlive every tombstone: a replica that replays it must
    // learn everything its sled would hold.
    let keep = settings.store.retention().tombstones.as_secs().max(3600);
    stream.insert(
        "x-max-age".into(),
        AMQPValue::LongString(format!("{keep}s").into()),
    );
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(name.as_str().into(), durable, stream)
        .await?;
    let _ = channel.close(200, "stream declared".into()).await;
    Ok(())
}

fn partitions(settings: &Settings) -> u32 {
    u32::try_from(settings.cluster.partitions).unwrap_or(1)
}

/// What a replica keeps across broker sessions.
#[derive(Debug)]
pub struct Replica {
    me: Heartbeat,
    members: Arc<Members>,
    slots: Arc<Semaphore>,
    counter: Arc<AtomicU64>,
    checked: std::sync::atomic::AtomicBool,
    /// A session ran before (the next one is a reconnect).
    reconnecting: std::sync::atomic::AtomicBool,
    forwarder: Arc<forward::Forwarder>,
}

impl Replica {
    /// A replica as configured (call only with `cluster.enabled`).
    pub fn new(settings: &Settings) -> Self {
        let me = Heartbeat {
            replica: settings.cluster.replica_id.clone().unwrap_or_default(),
            instance: instance_id(),
            partitions: partitions(settings),
            leaving: false,
        };
        let timeout = Duration::from_millis(settings.cluster.member_timeout_ms);
        Replica {
            members: Members::new(me.clone(), timeout),
            me,
            slots: Arc::new(Semaphore::new(usize::from(settings.amqp.prefetch))),
            counter: Arc::default(),
            checked: Default::default(),
            reconnecting: Default::default(),
            forwarder: Arc::new(forward::Forwarder::new(
                &settings.amqp.commands_queue,
                partitions(settings),
                Duration::from_millis(settings.http.callback_timeout_ms.max(1000)),
                settings.operator_token().map(|t| t.expose()),
            )),
        }
    }

    /// Sends state-changing requests to the refund's owner (the HTTP side
    /// uses it).
    pub fn forwarder(&self) -> Arc<forward::Forwarder> {
        self.forwarder.clone()
    }
}

/// How a cluster session ended.
#[derive(Debug)]
pub enum End {
    /// Shutdown asked; partitions given back.
    Shutdown,
    /// The session failed; reconnect.
    Lost(String),
}

/// One broker connection's life in cluster mode.
pub async fn session(
    replica: &Replica,
    settings: &Settings,
    worker: &Worker,
    health: &Health,
    mut shutdown: Shutdown,
) -> Result<End, ClusterError> {
    let amqp = &settings.amqp;
    let timeout = Duration::from_millis(amqp.confirm_timeout_ms);
    let journal = worker
        .store()
        .journal()
        .cloned()
        .ok_or_else(|| ClusterError::Log("the store is not in cluster mode".into()))?;
    let connection =
        broker::connect_with(amqp, &format!("refund-worker {}", replica.me.replica)).await?;
    let setup = connection.create_channel().await?;
    if let Err(e) = topology::declare(&setup, settings).await {
        if e.to_string().contains("inequivalent arg") {
            // A queue of a single-node deployment (classic) is in the way.
            return Err(ClusterError::Refused(format!(
                "{e}: a queue of this deployment exists with other arguments, most likely a classic queue from single-node mode; cluster mode needs quorum queues: drain it and delete it, or give the cluster its own names (amqp.commands_queue, amqp.dead_letter_queue, amqp.delay_queue_prefix)"
            )));
        }
        return Err(e.into());
    }
    let _ = setup.close(200, "topology declared".into()).await;
    declare(&connection, settings).await?;
    // A reconnect's first minute (the broker may be failing over): events
    // are published once more by the outbox sweep, moves are checked again
    // (`router::Checks`). Not at a replica's start: a healthy start must
    // not pay for it (the benchmark, a deployment's first minutes).
    let reconnect = replica
        .reconnecting
        .load(std::sync::atomic::Ordering::Relaxed);
    let now = std::time::Instant::now();
    let window_end = if reconnect {
        now + router::RECHECK_WINDOW
    } else {
        now
    };
    let publisher = Publisher::new(connection.create_channel().await?, amqp)
        .await?
        .keep_marks_until(window_end);
    let mut tasks = JoinSet::new();
    let log = log::start(
        &connection,
        &state_stream(settings),
        worker.store(),
        &replica.me.replica,
        &replica.me.instance,
        timeout,
        &mut tasks,
    )
    .await?;
    info!("reading the state log");
    log.catch_up(replica.me.partitions).await?;
    info!("caught up with the state log");
    // From here on, the next session is a reconnect.
    replica
        .reconnecting
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let every = Duration::from_millis(settings.cluster.heartbeat_ms);
    let heartbeats = connection.create_channel().await?;
    members::start(
        heartbeats.clone(),
        &heartbeat_exchange(settings),
        replica.members.clone(),
        every,
        &mut tasks,
    )
    .await?;
    if !replica.checked.load(std::sync::atomic::Ordering::Relaxed) {
        // Listen before taking work: a replica with the same id or another
        // P refuses to start.
        tokio::time::sleep(every * 2 + Duration::from_millis(500)).await;
        if let Some(reason) = replica.members.conflict() {
            return Err(ClusterError::Refused(reason));
        }
        replica
            .checked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    replica
        .forwarder
        .attach(connection.create_channel().await?, &mut tasks)
        .await?;
    let resubscribe_idle = Duration::from_millis(settings.cluster.resubscribe_idle_ms);
    let checks = router::Checks::until(worker.store().clone(), window_end);
    let router_publish = connection.create_channel().await?;
    let start_router = || async {
        Ok::<_, lapin::Error>(tokio::spawn(router::run(
            connection.create_channel().await?,
            router_publish.clone(),
            amqp.commands_queue.clone(),
            replica.me.partitions,
            timeout,
            resubscribe_idle,
            checks.clone(),
        )))
    };
    let mut router = start_router().await?;
    worker.set_side_publisher(Some(publisher.clone()));
    health.set_broker(true);
    health.set_consuming(true);
    let shared = Shared {
        worker: Arc::new(worker.clone()),
        publisher: Arc::new(publisher),
        log,
        journal: journal.clone(),
        slots: replica.slots.clone(),
        counter: replica.counter.clone(),
        queue_prefix: amqp.commands_queue.clone(),
        prefetch: amqp.prefetch,
        timeout,
        forwarder: replica.forwarder.clone(),
        resubscribe_idle,
    };
    let mut owned: BTreeMap<u32, Owned> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut reported = None;
    let end = loop {
        tokio::select! {
            _ = shutdown.triggered() => break End::Shutdown,
            done = &mut router => match done {
                // Idle: on a fresh channel (`cluster.resubscribe_idle_ms`).
                Ok(Ok(())) => match start_router().await {
                    Ok(again) => router = again,
                    Err(e) => break End::Lost(e.to_string()),
                },
                Ok(Err(e)) => break End::Lost(e.to_string()),
                Err(e) => break End::Lost(e.to_string()),
            },
            Some(done) = tasks.join_next() => {
                let reason = match done {
                    Ok(Err(ClusterError::Refused(reason))) => return Err(ClusterError::Refused(reason)),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "a cluster task ended".into(),
                    Err(e) => e.to_string(),
                };
                break End::Lost(reason);
            }
            _ = tick.tick() => {
                let conflict = replica.members.conflict();
                if conflict.is_some() && conflict != reported {
                    error!(reason = conflict.as_deref().unwrap_or_default(), "cluster conflict: another replica is misconfigured (it refuses to start)");
                }
                reported = conflict;
                let mine = replica.members.mine();
                let mut failed = None;
                let keys: Vec<u32> = owned.keys().copied().collect();
                for p in keys {
                    let gone = !mine.contains(&p);
                    if gone {
                        if let Some(partition) = owned.get(&p) {
                            partition.give_back();
                        }
                    }
                    if owned.get(&p).is_some_and(Owned::finished) {
                        if let Some(partition) = owned.remove(&p) {
                            if let Err(e) = partition.join().await {
                                failed = Some(e.to_string());
                            }
                        }
                    }
                }
                // After the removals: a consumer that stopped because it
                // was idle is back within the same tick.
                for p in &mine {
                    if !owned.contains_key(p) {
                        match Owned::start(&connection, shared.clone(), *p).await {
                            Ok(partition) => { owned.insert(*p, partition); }
                            Err(e) => failed = Some(e.to_string()),
                        }
                    }
                }
                journal.set_assigned(owned.keys().copied().collect());
                if let Some(reason) = failed {
                    break End::Lost(reason);
                }
            }
        }
    };
    // Shutdown: every partition is handed over after its in-flight refunds
    // finished and acked. Broker failure: the consumers stop at once; the
    // refunds in flight finish through the next session's log (their acks
    // fail and the broker redelivers them; the records tell what happened).
    for partition in owned.values() {
        match end {
            End::Shutdown => partition.give_back(),
            End::Lost(_) => partition.leave(),
        }
    }
    for (_, partition) in owned {
        let _ = partition.join().await;
    }
    if matches!(end, End::Shutdown) {
        journal.disown_all();
        // No heartbeat after the goodbye.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        members::leave(&heartbeats, &heartbeat_exchange(settings), &replica.me).await;
    }
    router.abort();
    worker.set_side_publisher(None);
    tasks.abort_all();
    let _ = connection.close(200, "session over".into()).await;
    if let End::Lost(reason) = &end {
        warn!(%reason, "cluster session ended");
    }
    Ok(end)
}

/// A fresh id for this process: a restarted replica is a new instance of
/// the same `replica_id`.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    crate::command::hex(&bytes)
}
