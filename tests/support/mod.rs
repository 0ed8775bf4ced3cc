//! Test support: a private broker node, the in-process sandbox, and
//! [`TestApp`], which starts the real worker on random ports the way
//! `refund-worker run` does.
#![allow(dead_code, unreachable_pub)]

pub mod broker;
pub mod postgres;

use broker::RabbitNode;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use refund_sandbox::{Sandbox, SandboxConfig};
use refund_worker::config::{Settings, DEFAULT_TOML};
use refund_worker::service::app::App;
use refund_worker::service::shutdown::{self, ShutdownTrigger};
use serde_json::Value;
use std::time::Duration;
use tokio::task::JoinHandle;

pub const HYP_REFUND: &str = include_str!("../../examples/hyp-pay-refund.json");
pub const HYP_CANCEL: &str = include_str!("../../examples/hyp-pay-cancel.json");
pub const HYP_DECLINE: &str = include_str!("../../examples/hyp-pay-decline.json");
pub const INVALID: &str = include_str!("../../examples/invalid-command.json");

/// The operator token every test worker is configured with.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// Whether this run's workers keep their refunds in PostgreSQL
/// (`REFUND_WORKER_TEST_BACKEND=postgres`): the end-to-end tests run once
/// against each backend (`scripts/test`).
pub fn on_postgres() -> bool {
    std::env::var("REFUND_WORKER_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A running worker with its own vhost, store, sandbox and event queue.
pub struct TestApp {
    pub amqp_url: String,
    pub http_addr: std::net::SocketAddr,
    /// The callback listener, when `http.callback_addr` is set.
    pub callback_addr: Option<std::net::SocketAddr>,
    pub sandbox: Sandbox,
    pub sandbox_url: String,
    pub store_dir: tempfile::TempDir,
    pub channel: Channel,
    _connection: Connection,
    events: lapin::Consumer,
    trigger: Option<ShutdownTrigger>,
    task: Option<JoinHandle<()>>,
    pub settings: Settings,
}

/// Settings for a test worker: defaults plus the test's broker, store,
/// sandbox and fast retries.
pub fn test_settings(amqp_url: &str, store: &std::path::Path, sandbox_url: &str) -> Settings {
    let layer = settings_layer(amqp_url, store, sandbox_url);
    let settings: Settings = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .add_source(config::File::from_str(&layer, config::FileFormat::Toml))
        .build()
        .expect("config")
        .try_deserialize()
        .expect("settings");
    settings.validate().expect("valid settings");
    settings
}

/// The test configuration as a TOML layer (also written to a file for
/// tests that run the worker binary as a child process).
pub fn settings_layer(amqp_url: &str, store: &std::path::Path, sandbox_url: &str) -> String {
    format!(
        r#"
        [amqp]
        url = "{amqp_url}"
        confirm_timeout_ms = 5000
        [store]
        path = "{store}"
        [http]
        addr = "127.0.0.1:0"
        operator_token = "{OPERATOR_TOKEN}"
        [retry]
        max_attempts = 3
        initial_delay_ms = 20
        max_delay_ms = 100
        deadline_ms = 5000
        [provider_http]
        timeout_ms = 2000
        connect_timeout_ms = 500
        [providers.hyp_pay]
        kind = "hyp_pay"
        base_url = "{sandbox_url}/p/"
        masof = "0010131918"
        pass_p = "sandbox-pass"
        [providers.creditguard]
        kind = "creditguard"
        base_url = "{sandbox_url}/xpo/Relay"
        user = "sandbox-user"
        password = "sandbox-pass"
        terminal_number = "0882819014"
        dedupe_requests = true
        [providers.creditguard_plain]
        kind = "creditguard"
        base_url = "{sandbox_url}/xpo/Relay"
        user = "sandbox-user"
        password = "sandbox-pass"
        terminal_number = "0882819014"
        [providers.paynet]
        kind = "paynet"
        base_url = "{sandbox_url}"
        secret_key = "sandbox-secret"
        [providers.hyp_payouts]
        kind = "hyp_pay"
        base_url = "{sandbox_url}/p/"
        masof = "0010131918"
        pass_p = "sandbox-pass"
        z_pass = "sandbox-zpass"
        payouts.enabled = true
        payouts.max_amount_minor = 50000
        payouts.daily_limit_minor = 100000
        "#,
        store = store.display()
    )
}

/// The test's own connection: a confirm-mode channel for publishing and an
/// exclusive queue bound to every event.
pub async fn test_client(
    amqp_url: &str,
    settings: &Settings,
) -> (Connection, Channel, lapin::Consumer) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("test connection");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .exchange_declare(
            settings.amqp.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("events exchange");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("event queue");
    channel
        .queue_bind(
            queue.name().clone(),
            settings.amqp.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let events = channel
        .basic_consume(
            queue.name().clone(),
            "events".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume events");
    (connection, channel, events)
}

impl TestApp {
    /// Opens the test's own connection again (after a broker restart).
    pub async fn reconnect_test_client(&mut self) {
        let (connection, channel, events) = test_client(&self.amqp_url, &self.settings).await;
        self._connection = connection;
        self.channel = channel;
        self.events = events;
    }

    /// Starts everything with the default sandbox.
    pub async fn start() -> TestApp {
        Self::start_with(SandboxConfig::default(), |_| {}).await
    }

    /// Starts everything; `adjust` may change the settings.
    pub async fn start_with(
        sandbox_config: SandboxConfig,
        adjust: impl FnOnce(&mut Settings),
    ) -> TestApp {
        init_logs();
        let amqp_url = tokio::task::spawn_blocking(|| RabbitNode::shared().vhost())
            .await
            .expect("vhost");
        let sandbox = Sandbox::new(sandbox_config);
        let sandbox_addr = sandbox.spawn("127.0.0.1:0").await.expect("sandbox");
        let sandbox_url = format!("http://{sandbox_addr}");
        let store_dir = tempfile::tempdir().expect("store dir");
        let mut settings = test_settings(&amqp_url, store_dir.path(), &sandbox_url);
        if on_postgres() {
            let url = tokio::task::spawn_blocking(postgres::database)
                .await
                .expect("database");
            settings.store.backend = refund_worker::config::StoreBackend::Postgres;
            settings.store.postgres.url = Some(refund_worker::values::secret::Secret::new(url));
        }
        adjust(&mut settings);

        // Bind an event queue before the worker publishes anything.
        let (connection, channel, events) = test_client(&amqp_url, &settings).await;

        let mut app = TestApp {
            amqp_url,
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            callback_addr: None,
            sandbox,
            sandbox_url,
            store_dir,
            channel,
            _connection: connection,
            events,
            trigger: None,
            task: None,
            settings,
        };
        app.spawn_worker().await;
        app
    }

    /// The worker's store, opened by the test (the worker stopped, for
    /// sled: it holds the directory).
    pub async fn open_store(&self) -> refund_worker::store::Store {
        use refund_worker::store::{postgres::PgStore, Store};
        if on_postgres() {
            let store = PgStore::open(&self.settings.store.postgres)
                .await
                .expect("open");
            return Store::Postgres(store);
        }
        Store::open(&self.settings.store.path).expect("open")
    }

    /// Starts the worker (again) on the same store.
    pub async fn spawn_worker(&mut self) {
        let app = App::build(self.settings.clone()).await.expect("app");
        self.http_addr = app.http_addr().expect("http addr");
        self.callback_addr = app.callback_addr();
        let (trigger, listener) = shutdown::channel();
        self.trigger = Some(trigger);
        self.task = Some(tokio::spawn(async move {
            app.run(listener).await.expect("the worker runs");
        }));
        self.wait_ready().await;
    }

    /// Polls /readyz until it answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.http_addr);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the worker gracefully and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.fire();
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("worker stops")
                .expect("worker task");
        }
    }

    /// Publishes a command body (persistent, confirmed).
    pub async fn publish(&self, body: &str) {
        self.publish_raw(body.as_bytes(), Some("application/json"))
            .await;
    }

    /// Publishes a command body with a W3C `traceparent` header.
    pub async fn publish_traced(&self, body: &str, traceparent: &str) {
        publish_traced(
            &self.channel,
            &self.settings.amqp.commands_exchange,
            body,
            traceparent,
        )
        .await;
    }

    /// Publishes raw bytes with an optional content type.
    pub async fn publish_raw(&self, body: &[u8], content_type: Option<&str>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        self.channel
            .basic_publish(
                self.settings.amqp.commands_exchange.as_str().into(),
                "refund.hyp_pay".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// The next outcome event (body as JSON, plus its routing key). Every event
    /// a test receives this way is checked against the published schema.
    pub async fn next_event(&mut self) -> (String, Value) {
        let delivery = tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("an event in time")
            .expect("event stream open")
            .expect("event delivery");
        let body: Value = serde_json::from_slice(&delivery.data).expect("event is JSON");
        assert_matches_event_schema(&body);
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.message_id().as_ref().map(|s| s.to_string()),
            body["event_id"].as_str().map(str::to_string)
        );
        assert_eq!(
            props.correlation_id().as_ref().map(|s| s.to_string()),
            body["refund_id"].as_str().map(str::to_string)
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        (delivery.routing_key.to_string(), body)
    }

    /// Takes every event waiting, until none arrives for `quiet`; returns
    /// how many there were.
    pub async fn drain_events(&mut self, quiet: Duration) -> usize {
        let mut taken = 0;
        while let Ok(Some(_)) = tokio::time::timeout(quiet, self.events.next()).await {
            taken += 1;
        }
        taken
    }

    /// Asserts that no event arrives within `wait`.
    pub async fn assert_no_event(&mut self, wait: Duration) {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(wait, self.events.next()).await {
            panic!("unexpected event: {}", String::from_utf8_lossy(&d.data));
        }
    }

    /// Takes one message from the dead-letter queue, waiting for it.
    pub async fn next_dead_letter(&self) -> (Vec<u8>, FieldTable) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self
                .channel
                .basic_get(
                    self.settings.amqp.dead_letter_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic_get");
            if let Some(message) = got {
                let headers = message
                    .delivery
                    .properties
                    .headers()
                    .clone()
                    .unwrap_or_default();
                return (message.delivery.data.clone(), headers);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead letter arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The operator API client, with the token.
    pub fn api(&self) -> refund_worker::ops::WorkerApi {
        refund_worker::ops::WorkerApi::new(&format!("http://{}", self.http_addr)).with_token(Some(
            refund_worker::values::secret::Secret::new(OPERATOR_TOKEN),
        ))
    }

    /// A refund's record (or tombstone) through the operator API.
    pub async fn record(&self, refund_id: &str) -> Value {
        self.api()
            .refund(refund_id)
            .await
            .expect("operator API")
            .expect("refund known")
    }

    /// A refund's lifecycle state, `None` while the store has no record.
    pub async fn record_state(&self, refund_id: &str) -> Option<String> {
        let record = self.api().refund(refund_id).await.expect("operator API")?;
        record["state"]["state"].as_str().map(str::to_string)
    }

    /// Browses the dead-letter queue, replays what `filter` matches (in-doubt
    /// refunds only once resolved, as `refund-worker dlq replay` does) and
    /// closes it.
    pub async fn replay(
        &self,
        filter: &refund_worker::ops::dlq::Filter,
        limit: Option<usize>,
        dry_run: bool,
    ) -> refund_worker::ops::dlq::Report {
        let api = self.api();
        let mut dlq = refund_worker::ops::dlq::Dlq::open(&self.settings.amqp)
            .await
            .expect("browse");
        let report = dlq
            .replay(
                filter,
                limit,
                dry_run,
                self.settings.store.retention().tombstones,
                async |id: &str| api.still_in_doubt(id).await,
                |_| {},
            )
            .await
            .expect("replay");
        dlq.close().await;
        report
    }

    /// Waits until `queue` holds `want` messages.
    pub async fn wait_depth(&self, queue: &str, want: u32) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.queue_depth(queue).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} never reached {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Declares a durable queue bound to every event: unlike the test's
    /// exclusive one, it survives a broker restart.
    pub async fn capture_events(&self, queue: &str) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        self.channel
            .queue_bind(
                queue.into(),
                self.settings.amqp.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// The next event captured in `queue` (see [`TestApp::capture_events`]),
    /// if one is there; reconnects after a broker restart.
    pub async fn captured(&mut self, queue: &str) -> Option<Value> {
        match self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(message)) => {
                let event: Value = serde_json::from_slice(&message.delivery.data).expect("json");
                assert_matches_event_schema(&event);
                Some(event)
            }
            Ok(None) => None,
            Err(_) => {
                self.reconnect_test_client().await;
                None
            }
        }
    }

    /// Messages waiting in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        queue_depth(&self.channel, queue)
            .await
            .expect("passive declare")
    }
}

/// Messages waiting in `queue` (a passive declaration; an error when the
/// queue does not exist, which closes the channel).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.fire();
        }
    }
}

/// A string header.
pub fn header(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The limits and breaker settings of a provider account.
pub fn policy_mut<'a>(
    settings: &'a mut Settings,
    account: &str,
) -> &'a mut refund_worker::providers::gate::AccountPolicy {
    use refund_worker::providers::ProviderAccount;
    match settings.providers.get_mut(account).expect("account") {
        ProviderAccount::HypPay(a) => &mut a.policy,
        ProviderAccount::Creditguard(a) => &mut a.policy,
        ProviderAccount::Paynet(a) => &mut a.policy,
    }
}

/// Replaces the `refund_id` of an example command.
pub fn with_refund_id(body: &str, refund_id: &str) -> String {
    let mut v: Value = serde_json::from_str(body).expect("example");
    v["refund_id"] = Value::String(refund_id.into());
    v.to_string()
}

/// Every log line of this test process, for tests that search them (a
/// card token must never appear in one).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// What the log subscriber writes: the line into [`LOGS`], and printed, so
/// the test harness shows it with a failing test's output.
struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        print!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The worker's own lines from debug up (so that a search of them covers
/// what an operator turning up the level would see), others from warn.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,refund_worker=debug".into()),
        )
        .with_writer(|| Capture)
        .with_ansi(false)
        .try_init();
}

/// Everything logged in this process so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).to_string()
}

/// The published JSON Schema of outcome events (`docs/schemas/`).
pub fn event_schema() -> &'static jsonschema::Validator {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(include_str!("../../docs/schemas/outcome-event.schema.json"))
                .expect("schema is JSON");
        jsonschema::validator_for(&schema).expect("a valid schema")
    })
}

/// Fails the test when `event` does not match the published schema.
pub fn assert_matches_event_schema(event: &Value) {
    let errors: Vec<String> = event_schema()
        .iter_errors(event)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "event off its schema: {errors:?}\n{event}"
    );
}

/// Publishes a command body (persistent, JSON, confirmed) with a W3C
/// `traceparent` header.
pub async fn publish_traced(channel: &Channel, exchange: &str, body: &str, traceparent: &str) {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    channel
        .basic_publish(
            exchange.into(),
            "refund.hyp_pay".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}
