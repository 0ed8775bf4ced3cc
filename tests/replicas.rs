//! Replicas sharing PostgreSQL, as an operator runs them: three worker
//! processes configured only through `REFUND_WORKER__` variables
//! (`STORE__BACKEND=postgres`, `STORE__POSTGRES__URL`, ...), competing
//! consumers of quorum queues on a private 3-node RabbitMQ cluster, with a
//! private PostgreSQL server. One cluster and one server for the binary
//! (forming the cluster takes about 30 s); the scenarios run one at a time
//! (they kill shared parts).

mod support;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use refund_sandbox::{Sandbox, SandboxConfig, Seed};
use refund_testkit::local_cluster::LocalCluster;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TOKEN: &str = "replica-test-operator-token";
/// The lease of the test replicas (short, so that the freeze scenario is).
const LEASE_SECS: u64 = 5;

static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> &'static LocalCluster {
    CLUSTER.get_or_init(|| LocalCluster::start(3).expect("3-node cluster"))
}

/// Everything one scenario runs on.
struct Rig {
    urls: Vec<String>,
    database: String,
    sandbox: Sandbox,
    sandbox_url: String,
    dir: tempfile::TempDir,
    channel: Channel,
    _connection: Connection,
}

struct Replica {
    http: String,
    child: Option<Child>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Rig {
    async fn new(config: SandboxConfig) -> Rig {
        let urls = tokio::task::spawn_blocking(|| cluster().vhost().expect("vhost"))
            .await
            .expect("vhost");
        let database = tokio::task::spawn_blocking(support::postgres::database)
            .await
            .expect("database");
        let sandbox = Sandbox::new(config);
        let addr = sandbox.spawn("127.0.0.1:0").await.expect("sandbox");
        let urls: Vec<String> = urls.split(',').map(str::to_string).collect();
        let (connection, channel) = open_channel(&urls).await;
        capture_events(&channel).await;
        Rig {
            urls,
            database,
            sandbox,
            sandbox_url: format!("http://{addr}"),
            dir: tempfile::tempdir().expect("dir"),
            channel,
            _connection: connection,
        }
    }

    /// A replica process, configured through the environment only.
    fn replica(&self, name: &str) -> Replica {
        let mut replica = Replica {
            http: free_addr(),
            child: None,
        };
        self.start(&mut replica, name);
        replica
    }

    fn start(&self, replica: &mut Replica, name: &str) {
        self.start_with(replica, name, |_| {});
    }

    fn start_with(&self, replica: &mut Replica, name: &str, adjust: impl Fn(&mut Command)) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_refund-worker"));
        command
            .args(["run", "--log-format", "json"])
            .env("REFUND_WORKER__HTTP__ADDR", &replica.http);
        self.environment(&mut command, name);
        adjust(&mut command);
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("worker binary");
        replica.child = Some(child);
    }

    /// The replicas' configuration, in the environment.
    fn environment(&self, command: &mut Command, name: &str) {
        let sandbox = &self.sandbox_url;
        command
            .env("RUST_LOG", "info")
            .env("REFUND_WORKER__AMQP__URL", self.urls.join(","))
            .env("REFUND_WORKER__AMQP__PREFETCH", "32")
            .env("REFUND_WORKER__STORE__BACKEND", "postgres")
            .env("REFUND_WORKER__STORE__POSTGRES__URL", &self.database)
            .env(
                "REFUND_WORKER__STORE__POSTGRES__LEASE",
                format!("{LEASE_SECS}s"),
            )
            .env("REFUND_WORKER__STORE__PATH", self.dir.path().join(name))
            .env("REFUND_WORKER__HTTP__OPERATOR_TOKEN", TOKEN)
            .env("REFUND_WORKER__RETRY__DELAYED_MS", "1000,2000")
            .env("REFUND_WORKER__PROVIDER_HTTP__TIMEOUT_MS", "3000")
            .env("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay")
            .env(
                "REFUND_WORKER__PROVIDERS__HYP_PAY__BASE_URL",
                format!("{sandbox}/p/"),
            )
            .env("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918")
            .env("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "sandbox-pass")
            .env("REFUND_WORKER__PROVIDERS__PAYNET__KIND", "paynet")
            .env("REFUND_WORKER__PROVIDERS__PAYNET__BASE_URL", sandbox)
            .env(
                "REFUND_WORKER__PROVIDERS__PAYNET__SECRET_KEY",
                "sandbox-secret",
            );
    }

    fn kill(&self, replica: &mut Replica) {
        if let Some(mut child) = replica.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn publish(&mut self, body: &str) {
        publish(&self.urls, &mut self.channel, body).await;
    }

    /// Captured events, by refund id, until none comes for `quiet` (or
    /// `until` says enough).
    async fn events(
        &mut self,
        seen: &mut BTreeMap<String, Vec<Value>>,
        quiet: Duration,
        until: impl Fn(&BTreeMap<String, Vec<Value>>) -> bool,
    ) {
        let mut last = Instant::now();
        while last.elapsed() < quiet && !until(seen) {
            match self
                .channel
                .basic_get("events.captured".into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(message)) => {
                    let event: Value =
                        serde_json::from_slice(&message.delivery.data).expect("json");
                    let id = event["refund_id"].as_str().unwrap_or_default().to_string();
                    seen.entry(id).or_default().push(event);
                    last = Instant::now();
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => {
                    let (connection, channel) = open_channel(&self.urls).await;
                    self.channel = channel;
                    self._connection = connection;
                }
            }
        }
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").to_string()
}

async fn open_channel(urls: &[String]) -> (Connection, Channel) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        let url = &urls[i % urls.len()];
        i += 1;
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        {
            if let Ok(ch) = c.create_channel().await {
                if ch
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .is_ok()
                {
                    return (c, ch);
                }
            }
        }
        assert!(Instant::now() < deadline, "no broker node answers");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A quorum queue bound to every event: it survives a node's loss.
async fn capture_events(channel: &Channel) {
    channel
        .exchange_declare(
            "refunds.events".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("events exchange");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            "events.captured".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("capture queue");
    channel
        .queue_bind(
            "events.captured".into(),
            "refunds.events".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

/// Publishes with confirm, retrying through a node's outage.
async fn publish(urls: &[String], channel: &mut Channel, body: &str) {
    for _ in 0..40 {
        let sent = async {
            channel
                .basic_publish(
                    "refunds.commands".into(),
                    "refund.hyp_pay".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await?
                .await
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(c)) if c.is_ack() => return,
            _ => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (connection, ch) = open_channel(urls).await;
                *channel = ch;
                std::mem::forget(connection);
            }
        }
    }
    panic!("could not publish a command");
}

async fn ready(replica: &Replica) -> bool {
    reqwest::get(format!("http://{}/readyz", replica.http))
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn wait_ready(replicas: &[&Replica]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for replica in replicas {
        while !ready(replica).await {
            assert!(
                Instant::now() < deadline,
                "replica {} never ready",
                replica.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn signal(replica: &Replica, signal: &str) {
    let pid = replica.child.as_ref().expect("running").id().to_string();
    let status = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

const FIRST_ORIGINAL: u64 = 71_000_000;

fn refund(i: usize) -> String {
    json!({
        "refund_id": format!("rf-rep-{i}"),
        "provider": "hyp_pay",
        "transaction": { "id": (FIRST_ORIGINAL + i as u64).to_string() },
        "amount": { "minor": 1000, "currency": "ILS" },
    })
    .to_string()
}

/// 400 refunds and 80 late duplicates (1–3 s after their first copy)
/// through a replica killed (SIGKILL) and restarted, one frozen (SIGSTOP)
/// past its lease, a broker node killed and restarted, and PostgreSQL
/// stopped with `-m immediate` and started again: none is paid twice,
/// none is lost, no refund gets contradicting outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_pay_each_refund_once_through_kills_freezes_and_outages() {
    let _one = ONE_AT_A_TIME.lock().await;
    let config = SandboxConfig {
        latency: Duration::from_millis(100),
        seed: Seed::hyp_pay_range(FIRST_ORIGINAL, 400, 100_000),
        ..Default::default()
    };
    let mut rig = Rig::new(config).await;
    let mut r1 = rig.replica("r1");
    let r2 = rig.replica("r2");
    let r3 = rig.replica("r3");
    wait_ready(&[&r1, &r2, &r3]).await;

    let urls = rig.urls.clone();
    let publisher = tokio::spawn(async move {
        let (_connection, mut channel) = open_channel(&urls).await;
        let started = Instant::now();
        for i in 0..400 {
            publish(&urls, &mut channel, &refund(i)).await;
            // A late duplicate of every fifth refund, published again 1–3 s
            // after its first copy.
            if i >= 20 && i % 5 == 0 {
                publish(&urls, &mut channel, &refund(i - 20)).await;
            }
            let due = Duration::from_millis(75 * (i as u64 + 1));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    });

    let cluster = cluster();
    let server = support::postgres::shared();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.kill(&mut r1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.start(&mut r1, "r1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&r2, "-STOP");
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 4)).await;
    signal(&r2, "-CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = &cluster.nodes[2];
    node.kill().expect("kill node");
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::spawn_blocking(move || node.restart().expect("restart node"))
        .await
        .expect("restart");
    tokio::task::spawn_blocking(move || {
        server.crash().expect("crash postgres");
        std::thread::sleep(Duration::from_secs(2));
        server.start_again().expect("start postgres");
    })
    .await
    .expect("postgres");
    publisher.await.expect("publisher");

    // Every refund has an outcome that is not a guess; in doubt is one.
    let mut seen = BTreeMap::new();
    let settled = |seen: &BTreeMap<String, Vec<Value>>| {
        (0..400).all(|i| {
            seen.get(&format!("rf-rep-{i}")).is_some_and(|events| {
                events
                    .iter()
                    .any(|e| e["status"] == "succeeded" || e["status"] == "in_doubt")
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while !settled(&seen) && Instant::now() < deadline {
        rig.events(&mut seen, Duration::from_secs(5), settled).await;
    }
    // Stragglers (late answers settling doubt, duplicates' re-publications).
    rig.events(&mut seen, Duration::from_secs(5), |_| false)
        .await;

    let mut executed: BTreeMap<String, usize> = BTreeMap::new();
    for e in rig.sandbox.journal() {
        *executed.entry(e.original_id).or_default() += 1;
    }
    let mut in_doubt = 0;
    for i in 0..400 {
        let id = format!("rf-rep-{i}");
        let original = (FIRST_ORIGINAL + i as u64).to_string();
        let paid = executed.get(&original).copied().unwrap_or(0);
        assert!(paid <= 1, "{id} paid {paid} times");
        let events = seen.get(&id).cloned().unwrap_or_default();
        let statuses: Vec<&str> = events.iter().filter_map(|e| e["status"].as_str()).collect();
        assert!(
            statuses
                .iter()
                .any(|s| *s == "succeeded" || *s == "in_doubt"),
            "{id} has no outcome: {statuses:?}"
        );
        assert!(
            !statuses.iter().any(|s| *s == "failed" || *s == "rejected"),
            "{id}: {statuses:?}"
        );
        if statuses.contains(&"succeeded") {
            assert_eq!(paid, 1, "{id} succeeded without a payment");
        } else {
            in_doubt += 1;
        }
    }
    eprintln!("400 refunds: {in_doubt} in doubt, {} paid", executed.len());
    // The refunds in doubt were in provider calls when a replica stopped
    // (killed, frozen): each replica holds at most its prefetch.
    assert!(in_doubt <= 64, "{in_doubt} in doubt");
}

/// 100 pairs of refunds over one charge (600 + 600 of 1 000) published at
/// once to replicas consuming one queue: exactly one of each pair is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_of_one_charge_on_different_replicas_pay_exactly_one() {
    let _one = ONE_AT_A_TIME.lock().await;
    let first = 72_000_000;
    let config = SandboxConfig {
        latency: Duration::from_millis(20),
        seed: Seed::hyp_pay_range(first, 100, 1_000),
        ..Default::default()
    };
    let mut rig = Rig::new(config).await;
    let replicas = [rig.replica("a"), rig.replica("b"), rig.replica("c")];
    wait_ready(&[&replicas[0], &replicas[1], &replicas[2]]).await;
    for pair in 0..100u64 {
        for half in ["x", "y"] {
            let body = json!({
                "refund_id": format!("rf-half-{pair}-{half}"),
                "provider": "hyp_pay",
                "transaction": { "id": (first + pair).to_string() },
                "amount": { "minor": 600, "currency": "ILS" },
                "original_amount": 1000,
            })
            .to_string();
            rig.publish(&body).await;
        }
    }
    let mut seen = BTreeMap::new();
    rig.events(&mut seen, Duration::from_secs(10), |seen| seen.len() >= 200)
        .await;
    let mut executed: BTreeMap<String, usize> = BTreeMap::new();
    for e in rig.sandbox.journal() {
        *executed.entry(e.original_id).or_default() += 1;
    }
    for pair in 0..100u64 {
        let statuses: Vec<String> = ["x", "y"]
            .iter()
            .map(|half| {
                let events = &seen[&format!("rf-half-{pair}-{half}")];
                events[0]["status"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["rejected", "succeeded"],
            "pair {pair}: {statuses:?}"
        );
        assert_eq!(executed[&(first + pair).to_string()], 1, "pair {pair}");
    }
}

/// A Paynet refund sent by one replica is settled by its callback posted
/// to another: the row is the truth, any replica answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paynet_callback_reaches_a_replica_that_did_not_send_the_refund() {
    let _one = ONE_AT_A_TIME.lock().await;
    let config = SandboxConfig {
        paynet_callback_delay: Duration::from_secs(600),
        ..Default::default()
    };
    let mut rig = Rig::new(config).await;
    let mut sender = rig.replica("sender");
    wait_ready(&[&sender]).await;
    rig.publish(include_str!("../examples/paynet-refund.json"))
        .await;
    let mut seen = BTreeMap::new();
    rig.events(&mut seen, Duration::from_secs(30), |s| !s.is_empty())
        .await;
    let id = "rf-example-paynet-refund-1";
    assert_eq!(seen[id][0]["status"], "pending");
    let other = rig.replica("other");
    wait_ready(&[&other]).await;
    rig.kill(&mut sender);
    let record: Value = reqwest::Client::new()
        .get(format!("http://{}/refunds/{id}", other.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("api")
        .json()
        .await
        .expect("json");
    let token = record["callback_token"].as_str().expect("token");
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{}/callbacks/paynet/{id}/{token}",
            other.http
        ))
        .json(&json!({"xact_id": "pn-77", "code": "0", "status": "approved", "message": "ok"}))
        .send()
        .await
        .expect("callback");
    assert!(answer.status().is_success(), "{}", answer.status());
    let mut seen = BTreeMap::new();
    rig.events(&mut seen, Duration::from_secs(30), |s| !s.is_empty())
        .await;
    assert_eq!(seen[id][0]["status"], "succeeded");
    assert_eq!(rig.sandbox.journal().len(), 1);
}

/// Growing from one node: a single node's sled store is copied into
/// PostgreSQL and its classic queues become quorum queues, keeping the
/// commands waiting in them; a replica then pays those once and answers a
/// late duplicate of an earlier refund from the copied record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_grows_into_replicas_without_losing_or_repeating_a_refund() {
    let _one = ONE_AT_A_TIME.lock().await;
    let first = 73_000_000;
    let config = SandboxConfig {
        seed: Seed::hyp_pay_range(first, 10, 100_000),
        ..Default::default()
    };
    let mut rig = Rig::new(config).await;
    let body = |i: u64| {
        json!({
            "refund_id": format!("rf-grow-{i}"),
            "provider": "hyp_pay",
            "transaction": { "id": (first + i).to_string() },
            "amount": { "minor": 1000, "currency": "ILS" },
        })
        .to_string()
    };
    let sled_env = |command: &mut Command| {
        command
            .env("REFUND_WORKER__STORE__BACKEND", "sled")
            .env_remove("REFUND_WORKER__STORE__POSTGRES__URL");
    };
    let mut single = Replica {
        http: free_addr(),
        child: None,
    };
    rig.start_with(&mut single, "single", sled_env);
    wait_ready(&[&single]).await;
    for i in 0..5 {
        rig.publish(&body(i)).await;
    }
    let mut seen = BTreeMap::new();
    rig.events(&mut seen, Duration::from_secs(20), |s| s.len() >= 5)
        .await;
    rig.kill(&mut single);
    // Commands keep arriving while the node is down.
    for i in 5..8 {
        rig.publish(&body(i)).await;
    }
    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_refund-worker"));
        command.args(args);
        rig.environment(&mut command, "single");
        sled_env(&mut command);
        let output = command.output().expect("run");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let copied = run(&["store", "copy", "--to", &rig.database.clone()]);
    assert!(copied.contains("\"records\": 5"), "{copied}");
    let migrated = run(&["queues", "to-quorum"]);
    assert!(
        migrated.contains("refunds.commands: now a quorum queue (3 message(s) moved)"),
        "{migrated}"
    );

    let replica = rig.replica("grown");
    wait_ready(&[&replica]).await;
    rig.publish(&body(0)).await;
    let mut seen = BTreeMap::new();
    let all = |s: &BTreeMap<String, Vec<Value>>| {
        [0, 5, 6, 7]
            .iter()
            .all(|i| s.contains_key(&format!("rf-grow-{i}")))
    };
    rig.events(&mut seen, Duration::from_secs(20), all).await;
    for i in 0..8 {
        if (1..5).contains(&i) {
            continue;
        }
        let events = seen
            .get(&format!("rf-grow-{i}"))
            .unwrap_or_else(|| panic!("no event for rf-grow-{i}: {seen:?}"));
        assert_eq!(events[0]["status"], "succeeded", "{i}: {events:?}");
    }
    assert_eq!(rig.sandbox.journal().len(), 8, "each paid once");
}
