//! The running service: HTTP listener, store, providers and the broker
//! session, supervised. Built once with [`App::build`] (which binds the HTTP
//! port, so tests can ask for port 0 and read the real one) and run with
//! [`App::run`] until the shutdown fires.
//!
//! Broker supervision is ours: when the connection or the consumer fails,
//! the session ends, readiness drops, and a new session reconnects with
//! backoff, re-declares the topology, re-enables confirms and QoS and
//! consumes again. Deliveries that were in flight come back redelivered and
//! their records tell what to do with each.

use crate::broker::publisher::Publisher;
use crate::broker::{self, topology};
use crate::config::Settings;
use crate::config::StoreBackend;
use crate::providers::Providers;
use crate::service::background;
use crate::service::http::{self, Health, Listeners};
use crate::service::shutdown::Shutdown;
use crate::store::{SledOptions, Store};
use crate::values::secret::redact_url;
use crate::worker::Worker;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

/// How long in-flight deliveries get to finish at shutdown.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened.
    #[error("opening the store at {path}: {source}")]
    Store {
        /// The configured path.
        path: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// An HTTP listener could not bind.
    #[error("binding {addr} (http.addr / http.callback_addr): {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Another worker consumes the commands queue.
    #[error("another worker is consuming the queue {0}: one worker per queue with store.backend = \"sled\" (each keeps its own store, so a second one would pay duplicates twice); stop the other one, or give this one its own amqp.commands_queue. To run several replicas of one deployment, give them a shared PostgreSQL database (store.backend = \"postgres\", docs/replicas.md)")]
    AnotherWorker(String),
    /// The store's configuration cannot work (the message names the key).
    #[error("{0}")]
    StoreConfig(String),
    /// The broker's TLS certificate is not trusted.
    #[error("the broker's TLS certificate is not trusted ({0}); give its CA in amqp.tls_ca_path (PEM) or fix amqp.url")]
    UntrustedBroker(String),
    /// The HTTP client could not be built.
    #[error("building the provider HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A built, not yet running, service.
#[derive(Debug)]
pub struct App {
    settings: Arc<Settings>,
    worker: Worker,
    listener: Listeners,
    health: Arc<Health>,
}

impl App {
    /// Opens the store, builds the providers and binds the HTTP listener.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        if broker::urls(&settings.amqp.url).any(|u| u.starts_with("amqps://")) {
            // A certificate we do not trust is a configuration error: stop
            // here instead of retrying forever. An unreachable broker is
            // not: the session loop waits for it.
            match broker::connect_with(&settings.amqp, "refund-worker-probe").await {
                Ok(connection) => {
                    let _ = connection.close(200, "probe".into()).await;
                }
                Err(e) if broker::is_untrusted_certificate(&e) => {
                    return Err(AppError::UntrustedBroker(e.to_string()));
                }
                Err(_) => {}
            }
        }
        let store = open_store(&settings).await?;
        let bind = |addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })
        };
        let private = bind(settings.http.addr.clone()).await?;
        let callbacks = match &settings.http.callback_addr {
            Some(addr) => Some(bind(addr.clone()).await?),
            None => None,
        };
        // Callback URLs need the real port when the address asked for port 0.
        let callback_listener = callbacks.as_ref().unwrap_or(&private);
        let public_url = match (&settings.http.public_url, callback_listener.local_addr()) {
            (None, Ok(bound)) => format!("http://{bound}"),
            _ => settings.public_url(),
        };
        let listener = Listeners { private, callbacks };
        let timeouts = crate::providers::HttpTimeouts {
            request: Duration::from_millis(settings.provider_http.timeout_ms),
            connect: Duration::from_millis(settings.provider_http.connect_timeout_ms),
        };
        let providers = Providers::new(&settings.providers, timeouts, &public_url)?;
        let settings = Arc::new(settings);
        Ok(App {
            worker: Worker::new(settings.clone(), store, providers),
            settings,
            listener,
            health: Arc::new(Health::default()),
        })
    }

    /// The bound private HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listener.private.local_addr().ok()
    }

    /// The bound callback address, when callbacks have their own listener.
    pub fn callback_addr(&self) -> Option<SocketAddr> {
        self.listener.callbacks.as_ref()?.local_addr().ok()
    }

    /// Runs until `shutdown` fires, then stops taking deliveries, lets the
    /// in-flight ones finish (up to a deadline), syncs the store and returns.
    /// Returns an error only when start-up finds another worker consuming
    /// the commands queue (see [`AppError::AnotherWorker`]).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AppError> {
        let App {
            settings,
            worker,
            listener,
            health,
        } = self;
        let tasks = spawn_background(&settings, &worker, listener, &health, &shutdown);
        let mut in_flight = JoinSet::new();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times()
            .with_jitter();
        let mut reconnect = backoff.build();
        info!(amqp = %redact_url(settings.amqp.url.expose()), "starting");
        let mut sessions = Sessions::default();
        let fatal = loop {
            let mut stop = shutdown.clone();
            let end = session(&settings, &worker, &health, &mut in_flight, stop.clone()).await;
            match sessions.next(end, &settings) {
                Next::Stop => break None,
                Next::Fatal(error) => break Some(error),
                // The session had connected: start the backoff afresh.
                Next::Reconnect { fresh: true } => reconnect = backoff.build(),
                Next::Reconnect { fresh: false } => {}
            }
            worker.set_side_publisher(None);
            health.set_consuming(false);
            health.set_broker(false);
            let delay = reconnect.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = stop.triggered() => break None,
                _ = tokio::time::sleep(delay) => {}
            }
        };
        health.set_consuming(false);
        drain(&mut in_flight).await;
        if let Err(e) = worker.store().close().await {
            error!(error = %e, "final store flush failed");
        }
        if let Some(fatal) = fatal {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(fatal);
        }
        for task in tasks {
            let _ = task.await;
        }
        info!("stopped");
        Ok(())
    }
}

/// The listeners and the periodic tasks, until `shutdown`.
fn spawn_background(
    settings: &Arc<Settings>,
    worker: &Worker,
    listener: Listeners,
    health: &Arc<Health>,
    shutdown: &Shutdown,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(http::serve(
            listener,
            health.clone(),
            worker.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(background::refresh_store_metrics(
            worker.store().clone(),
            settings.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(background::prune_periodically(
            worker.store().clone(),
            settings.store.retention(),
            settings.store.prune_every(),
            shutdown.clone(),
        )),
        tokio::spawn(background::sweep_outbox_periodically(
            worker.clone(),
            settings.store.outbox_sweep_every(),
            shutdown.clone(),
        )),
    ];
    if settings.store.backend == StoreBackend::Postgres {
        let every = (settings.store.postgres.lease / 2).min(Duration::from_secs(2));
        tasks.push(tokio::spawn(background::settle_cut_off_periodically(
            worker.clone(),
            every,
            shutdown.clone(),
        )));
    }
    tasks
}

/// What the run loop learned from the sessions so far.
#[derive(Debug, Default)]
struct Sessions {
    /// A session consumed the queue once: a later exclusive-use refusal is
    /// our own old connection lingering, not another worker.
    consumed: bool,
    /// Exclusive-use refusals before the first session consumed.
    refusals: u32,
}

impl Sessions {
    /// What to do after a session ended so.
    fn next(&mut self, end: Result<SessionEnd, lapin::Error>, settings: &Settings) -> Next {
        match end {
            Ok(SessionEnd::Shutdown) => Next::Stop,
            Ok(SessionEnd::Lost(reason)) => {
                self.consumed = true;
                warn!(%reason, "broker session lost; reconnecting");
                Next::Reconnect { fresh: true }
            }
            Ok(SessionEnd::Refused(reason)) if !self.consumed => {
                // Our own previous connection may linger for a moment
                // after a restart; a second worker does not go away.
                self.refusals += 1;
                warn!(%reason, refusals = self.refusals, "the commands queue is in exclusive use");
                if self.refusals >= START_REFUSALS {
                    let queue = settings.amqp.commands_queue.clone();
                    error!(%queue, "another worker consumes the commands queue; stopping");
                    Next::Fatal(AppError::AnotherWorker(queue))
                } else {
                    Next::Reconnect { fresh: false }
                }
            }
            Ok(SessionEnd::Refused(reason)) => {
                warn!(%reason, "the commands queue is in exclusive use; retrying");
                Next::Reconnect { fresh: false }
            }
            Ok(SessionEnd::Misfit(reason)) => {
                error!(%reason, "refusing to run");
                Next::Fatal(AppError::StoreConfig(reason))
            }
            Err(e) => {
                warn!(error = %e, "broker unreachable; retrying");
                broker::prefer_next_node();
                Next::Reconnect { fresh: false }
            }
        }
    }
}

/// Why this process should not take refunds now, if it should not.
fn unfit(publisher: &Publisher, store: &Store) -> Option<String> {
    if !publisher.is_open() {
        return Some("the broker closed the events channel: events cannot be published".into());
    }
    if !store.healthy() {
        return Some("the store is unavailable: refunds cannot be recorded".into());
    }
    None
}

/// The store `store.backend` names.
async fn open_store(settings: &Settings) -> Result<Store, AppError> {
    match settings.store.backend {
        StoreBackend::Sled => {
            let options = SledOptions {
                linger: Duration::from_micros(settings.store.group_commit_linger_us),
                cache_bytes: settings.store.cache_mib.saturating_mul(1 << 20),
                format: settings.store.record_format,
            };
            Store::open_sled(&settings.store.path, options).map_err(|source| AppError::Store {
                path: settings.store.path.display().to_string(),
                source,
            })
        }
        StoreBackend::Postgres => crate::store::postgres::PgStore::open(&settings.store.postgres)
            .await
            .map(Store::Postgres)
            .map_err(|e| AppError::StoreConfig(e.to_string())),
    }
}

/// Refusals of the exclusive consumer at start-up before giving up.
const START_REFUSALS: u32 = 5;

/// How often a session looks at its events channel.
const CHANNEL_WATCH: Duration = Duration::from_millis(250);

/// What the supervision loop does after a session.
enum Next {
    Stop,
    Reconnect {
        /// The session had connected: the backoff starts afresh.
        fresh: bool,
    },
    Fatal(AppError),
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// The broker's queues are not what this configuration needs.
    Misfit(String),
    /// The commands queue has another (exclusive) consumer.
    Refused(String),
}

/// One broker connection's life: declare, consume, hand out deliveries.
async fn session(
    settings: &Settings,
    worker: &Worker,
    health: &Health,
    in_flight: &mut JoinSet<()>,
    mut shutdown: Shutdown,
) -> Result<SessionEnd, lapin::Error> {
    let amqp = &settings.amqp;
    let (connection, publisher) = match prepare(settings, worker).await? {
        Ok(prepared) => prepared,
        Err(end) => return Ok(end),
    };
    let channel = connection.create_channel().await?;
    // `amqp.prefetch` deliveries are processed at once; the broker's window
    // is a little wider (see `lookahead`).
    let window = amqp.prefetch.saturating_add(lookahead(amqp.prefetch));
    channel
        .basic_qos(window, BasicQosOptions::default())
        .await?;
    let slots = Arc::new(Semaphore::new(usize::from(amqp.prefetch)));
    let mut slot = None;
    // Shared by every delivery of the session: one reference count each
    // instead of a deep clone (the accounts' map, the channel's handles).
    let (worker, publisher, channel) = (
        Arc::new(worker.clone()),
        Arc::new(publisher),
        Arc::new(channel),
    );
    let tag = format!("refund-worker-{}", std::process::id());
    let mut consumer = match start_consuming(&connection, &channel, &tag, settings).await? {
        Ok(consumer) => consumer,
        Err(end) => return Ok(end),
    };
    worker.set_side_publisher(Some(Publisher::clone(&publisher)));
    let dead_letters = start_dead_letter_watch(&connection, amqp).await?;
    health.set_broker(true);
    health.set_consuming(true);
    info!(
        queue = amqp.commands_queue.as_str(),
        prefetch = amqp.prefetch,
        "consuming"
    );
    let mut watch = tokio::time::interval(CHANNEL_WATCH);
    let end = loop {
        tokio::select! {
            _ = watch.tick() => if let Some(why) = unfit(&publisher, worker.store()) {
                break stop_taking(&connection, &channel, &tag, health, in_flight, why).await;
            },
            _ = shutdown.triggered() => {
                info!("shutdown: no new deliveries");
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                break SessionEnd::Shutdown;
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            // The semaphore is never closed.
            free = slots.clone().acquire_owned(), if slot.is_none() => slot = free.ok(),
            next = consumer.next(), if slot.is_some() => match next {
                Some(Ok(delivery)) => {
                    let (worker, publisher, channel) = (worker.clone(), publisher.clone(), channel.clone());
                    let slot = slot.take();
                    in_flight.spawn(async move { worker.handle(&publisher, channel, delivery, slot).await });
                }
                Some(Err(e)) => break SessionEnd::Lost(format!("consumer error: {e}")),
                None => break SessionEnd::Lost("the broker cancelled the consumer".into()),
            }
        }
    };
    dead_letters.abort();
    crate::observability::metrics::dead_letters_unknown();
    if matches!(end, SessionEnd::Shutdown) {
        // Let in-flight deliveries ack on this connection before closing it.
        drain(in_flight).await;
        let _ = channel.close(200, "shutting down".into()).await;
        let _ = connection.close(200, "shutting down".into()).await;
    }
    Ok(end)
}

/// Starts reading the dead-letter queue's depth on a channel of its own
/// for the session (`refund_worker_dead_letters_waiting`).
async fn start_dead_letter_watch(
    connection: &lapin::Connection,
    amqp: &crate::config::AmqpSettings,
) -> Result<JoinHandle<()>, lapin::Error> {
    let depth = connection.create_channel().await?;
    Ok(tokio::spawn(background::watch_dead_letters(
        depth,
        amqp.dead_letter_queue.clone(),
    )))
}

/// Events cannot be published (the broker closed the channel: a publish
/// refused for want of permission, the exchange deleted) or refunds cannot
/// be recorded (the database is down): stop taking refunds, let those in
/// flight finish or put themselves back, and end the session, to reconnect
/// once both work again.
async fn stop_taking(
    connection: &lapin::Connection,
    channel: &lapin::Channel,
    tag: &str,
    health: &Health,
    in_flight: &mut JoinSet<()>,
    why: String,
) -> SessionEnd {
    error!(%why, "not taking refunds");
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
    health.set_consuming(false);
    drain(in_flight).await;
    let _ = connection
        .close(200, "not fit to take refunds".into())
        .await;
    SessionEnd::Lost(why)
}

/// Checks the store answers, connects, declares the topology and opens
/// the events channel; then publishes the oldest unconfirmed event, so
/// that no provider is called while events cannot be published.
/// `Err(end)`: the session ends here.
async fn prepare(
    settings: &Settings,
    worker: &Worker,
) -> Result<Result<(lapin::Connection, Publisher), SessionEnd>, lapin::Error> {
    if !worker.store().healthy() {
        return Ok(Err(SessionEnd::Lost(
            "the store is unavailable: not taking refunds until it answers".into(),
        )));
    }
    let connection = broker::connect_with(&settings.amqp, "refund-worker").await?;
    let setup = connection.create_channel().await?;
    if let Err(e) = topology::declare(&setup, settings).await {
        let _ = connection.close(200, "topology refused".into()).await;
        if e.to_string().contains("inequivalent arg 'x-queue-type'") {
            return Ok(Err(SessionEnd::Misfit(topology::queue_type_mismatch(
                settings, &e,
            ))));
        }
        return Err(e);
    }
    let _ = setup.close(200, "topology declared".into()).await;
    let publisher = Publisher::new(connection.create_channel().await?, &settings.amqp).await?;
    // An event left unconfirmed (by the last session, or a channel the
    // broker closed) is published first, and a refusal ends the session.
    if let Err(e) = worker.publish_oldest_unconfirmed(&publisher).await {
        let _ = connection
            .close(200, "events cannot be published".into())
            .await;
        return Ok(Err(SessionEnd::Lost(format!(
            "events cannot be published ({e}); not taking refunds"
        ))));
    }
    Ok(Ok((connection, publisher)))
}

/// Starts the consumer of the commands queue (exclusive in single-node
/// mode). `Err(end)`: another consumer holds the queue.
async fn start_consuming(
    connection: &lapin::Connection,
    channel: &lapin::Channel,
    tag: &str,
    settings: &Settings,
) -> Result<Result<lapin::Consumer, SessionEnd>, lapin::Error> {
    let consumed = channel
        .basic_consume(
            settings.amqp.commands_queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions {
                exclusive: exclusive_consumer(settings),
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match consumed {
        Ok(consumer) => Ok(Ok(consumer)),
        Err(e) if e.to_string().contains("exclusive") => {
            let _ = connection.close(200, "queue in exclusive use".into()).await;
            Ok(Err(SessionEnd::Refused(e.to_string())))
        }
        Err(e) => Err(e),
    }
}

/// With sled each worker's store is the only record of its refunds, so a
/// second worker on the same queue would pay a duplicate again: the broker
/// refuses it, and start-up stops on it. Replicas sharing PostgreSQL are
/// competing consumers.
fn exclusive_consumer(settings: &Settings) -> bool {
    settings.store.backend == StoreBackend::Sled
}

/// Deliveries the broker may send beyond `amqp.prefetch`: a quarter of it.
/// They are the refunds whose outcome is written and whose event waits for
/// its sync and the broker's confirm (their delivery is acked after it, see
/// `worker/finish.rs`), and deliveries waiting in the consumer until a
/// processing slot is free, so that a freed slot starts its next refund at
/// once instead of a broker round trip later (at 50 ms provider latency,
/// prefetch 16 went from 288 to 300 refunds a second, measured). At most
/// `amqp.prefetch` refunds are processed at once either way.
fn lookahead(prefetch: u16) -> u16 {
    prefetch.div_ceil(4)
}

/// Waits for in-flight deliveries, up to [`DRAIN_DEADLINE`]. Those still
/// running then are dropped: their messages were not acked and will be
/// redelivered, and their records say how far they got.
async fn drain(in_flight: &mut JoinSet<()>) {
    if in_flight.is_empty() {
        return;
    }
    info!(count = in_flight.len(), "waiting for in-flight deliveries");
    let all = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, all).await.is_err() {
        warn!(
            count = in_flight.len(),
            "drain deadline passed; abandoning the rest"
        );
        in_flight.abort_all();
    }
}
