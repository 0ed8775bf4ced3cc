//! Cluster mode on a real 3-node RabbitMQ cluster with three replica
//! processes configured only through `REFUND_WORKER__` variables, as a
//! user would run them: commands and late duplicates (1–3 s after their
//! first copy) arrive while replicas are killed with SIGKILL and restarted,
//! one replica is killed for good, and a broker node is killed and
//! restarted. At the end no refund was executed twice, every refund has an
//! outcome, and the commands queue and every partition queue are empty.
//! One cluster for the whole binary (forming it takes about 30 s).

mod support;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use refund_worker::local_cluster::LocalCluster;
use refund_worker::sandbox::{Fault, FaultKind, Sandbox, SandboxConfig, Seed};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: &str = "8";
const FIRST_ORIGINAL: u64 = 81_000_000;
/// Originals seeded in the sandbox (the last ones for the in-doubt case).
const REFUND_ORIGINALS: usize = 400;

struct Replica {
    id: String,
    dir: std::path::PathBuf,
    child: Option<Child>,
    /// The private listener (health, readiness, operator API).
    http: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Rig {
    urls: String,
    /// Where providers post callbacks: the test's "load balancer".
    public_url: String,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn spawn(&self, replica: &mut Replica, extra: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let store = replica.dir.join("store");
        let child = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
            .args(["run", "--config"])
            .arg(&self.config)
            .args(["--log-format", "json"])
            // Where each command went, for a failed wait's diagnosis.
            .env("RUST_LOG", "info,refund_worker::cluster::router=debug")
            .env("REFUND_WORKER__AMQP__URL", &self.urls)
            .env("REFUND_WORKER__CLUSTER__ENABLED", "true")
            .env("REFUND_WORKER__CLUSTER__REPLICA_ID", &replica.id)
            .env("REFUND_WORKER__CLUSTER__PARTITIONS", PARTITIONS)
            // Consumers subscribe again after 2 s idle (30 s by default):
            // the test's quiet phases run through that path many times.
            .env("REFUND_WORKER__CLUSTER__RESUBSCRIBE_IDLE_MS", "2000")
            .env("REFUND_WORKER__AMQP__PREFETCH", "32")
            .env("REFUND_WORKER__STORE__PATH", store)
            .env("REFUND_WORKER__HTTP__ADDR", &replica.http)
            .env("REFUND_WORKER__HTTP__PUBLIC_URL", &self.public_url)
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("worker binary");
        replica.child = Some(child);
    }

    fn kill(&self, replica: &mut Replica) {
        if let Some(mut child) = replica.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn commands(prefix: &str, first: usize, n: usize) -> Vec<String> {
    (first..first + n)
        .map(|i| {
            serde_json::json!({
                "refund_id": format!("{prefix}-{i}"),
                "provider": "hyp_pay",
                "transaction": { "id": (FIRST_ORIGINAL + i as u64).to_string() },
                "amount": { "minor": 1_000, "currency": "ILS" },
            })
            .to_string()
        })
        .collect()
}

async fn connect(url: &str) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Publishes with confirm, retrying through a node's outage (a new
/// connection to another node when the current one breaks).
async fn publish(urls: &[String], channel: &mut Channel, body: &str) {
    let mut tries = 0;
    loop {
        tries += 1;
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
            _ if tries > 20 => panic!("could not publish a command"),
            _ => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let url = &urls[tries % urls.len()];
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
                            *channel = ch;
                            std::mem::forget(c);
                        }
                    }
                }
            }
        }
    }
}

/// Messages in `queue`, or `u32::MAX` when it does not exist (yet).
async fn depth(channel: &Channel, queue: &str) -> u32 {
    support::queue_depth(channel, queue)
        .await
        .unwrap_or(u32::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_cluster_never_pay_twice_or_lose_one() {
    const REFUNDS: usize = 300;
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(3))
        .await
        .expect("task")
        .expect("cluster");
    let urls_joined = cluster.vhost().expect("vhost");
    let urls: Vec<String> = urls_joined.split(',').map(str::to_string).collect();
    let mut seed = Seed::hyp_pay_range(FIRST_ORIGINAL, REFUND_ORIGINALS, 100_000);
    seed.paynet = Seed::default_seed().paynet;
    let sandbox = Sandbox::new(SandboxConfig {
        latency: Duration::from_millis(50),
        seed,
        // Paynet's answer comes after the test killed the refund's owner.
        paynet_callback_delay: Duration::from_secs(6),
        ..SandboxConfig::default()
    });
    let balancer = Balancer::default();
    let public_url = format!("http://{}", balancer.spawn().await);
    let sandbox_url = format!(
        "http://{}",
        sandbox.spawn("127.0.0.1:0").await.expect("sandbox")
    );
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        support::settings_layer(&urls[0], &dir.path().join("unused"), &sandbox_url),
    )
    .expect("config");
    let rig = Rig {
        urls: urls_joined.clone(),
        public_url,
        config,
        // CLUSTER_TEST_LOG=<file> keeps the replicas' log after the test.
        log: std::env::var("CLUSTER_TEST_LOG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| dir.path().join("replicas.log")),
        _dir: dir,
    };
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| {
            let dir = rig._dir.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir).expect("dir");
            Replica {
                id: format!("replica-{i}"),
                dir,
                child: None,
                http: free_addr(),
            }
        })
        .collect();
    for replica in &mut replicas {
        rig.spawn(replica, &[]);
    }

    // The test's client lives on the third node (the one never killed):
    // an event queue bound to every event. A classic queue, so it lives on
    // that node: the observer is not itself exposed to a leader election.
    let client = connect(&urls[2]).await;
    let events_channel = client.create_channel().await.expect("channel");
    let deadline = Instant::now() + Duration::from_secs(60);
    while depth(
        &client.create_channel().await.expect("ch"),
        "refunds.commands.p.0",
    )
    .await
        == u32::MAX
    {
        assert!(
            Instant::now() < deadline,
            "no topology (log: {})",
            rig.log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    events_channel
        .queue_declare(
            "test.events".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("events queue");
    events_channel
        .queue_bind(
            "test.events".into(),
            "refunds.events".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let events: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    {
        let events = events.clone();
        let mut consumer = events_channel
            .basic_consume(
                "test.events".into(),
                "test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let v: Value = serde_json::from_slice(&d.data).expect("event json");
                let id = v["refund_id"].as_str().unwrap_or_default().to_string();
                let status = v["status"].as_str().unwrap_or_default().to_string();
                events
                    .lock()
                    .expect("lock")
                    .entry(id)
                    .or_default()
                    .insert(status);
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        });
    }
    let mut publisher = client.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");

    let bodies = commands("rf-cl", 0, REFUNDS);
    let started = Instant::now();
    // Trickle: 300 commands over ~15 s; the copy of every 4th one follows
    // 1-3 s later; replicas and a node are killed meanwhile.
    let mut late: Vec<(Instant, String)> = Vec::new();
    let mut duplicates = 0;
    for (i, body) in bodies.iter().enumerate() {
        publish(&urls[1..], &mut publisher, body).await;
        if i % 4 == 0 {
            late.push((
                Instant::now() + Duration::from_millis(1000 + (i as u64 * 37) % 2000),
                body.clone(),
            ));
            duplicates += 1;
        }
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = late.drain(..).partition(|(at, _)| *at <= now);
        late = rest;
        for (_, body) in due {
            publish(&urls[1..], &mut publisher, &body).await;
        }
        match i {
            60 => {
                eprintln!("SIGKILL replica-2");
                rig.kill(&mut replicas[1]);
            }
            100 => {
                eprintln!("restart replica-2");
                rig.spawn(&mut replicas[1], &[]);
            }
            140 => {
                eprintln!("SIGKILL broker node 1 (the first URL, where the queues' leaders are)");
                cluster.nodes[0].kill().expect("kill node");
            }
            180 => {
                eprintln!("SIGKILL replica-1 and restart it");
                rig.kill(&mut replicas[0]);
                rig.spawn(&mut replicas[0], &[]);
            }
            200 => {
                eprintln!("restart broker node 1");
                let node = &cluster.nodes[0];
                tokio::task::block_in_place(|| node.restart()).expect("restart node");
            }
            240 => {
                eprintln!("SIGKILL replica-3 for good");
                rig.kill(&mut replicas[2]);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for (at, body) in late.drain(..) {
        tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
        publish(&urls[1..], &mut publisher, &body).await;
    }
    eprintln!(
        "published {REFUNDS} commands and {duplicates} late duplicates in {:?}",
        started.elapsed()
    );

    // Every refund gets an outcome.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = events.lock().expect("lock").len();
        if done >= REFUNDS {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = bodies
                .iter()
                .filter_map(|b| serde_json::from_str::<Value>(b).ok())
                .filter_map(|v| v["refund_id"].as_str().map(str::to_string))
                .filter(|id| !events.lock().expect("lock").contains_key(id))
                .collect();
            panic!(
                "only {done} of {REFUNDS} refunds have an outcome\n{}",
                diagnose(&rig, &cluster, &replicas, &missing).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // No refund executed twice.
    let mut per_original: BTreeMap<String, usize> = BTreeMap::new();
    for e in sandbox.journal() {
        *per_original.entry(e.original_id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_original.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "refunds executed twice: {twice:?} (log: {})",
        rig.log.display()
    );
    // No contradicting outcomes: one final status per refund (in_doubt may
    // precede an operator's decision, nothing else).
    let outcomes = events.lock().expect("lock").clone();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (refund, statuses) in &outcomes {
        let finals: Vec<_> = statuses.iter().filter(|s| *s != "in_doubt").collect();
        assert!(finals.len() <= 1, "{refund}: {statuses:?}");
        for s in statuses {
            *counts.entry(s.clone()).or_default() += 1;
        }
        if statuses.contains("succeeded") {
            let original = refund
                .rsplit('-')
                .next()
                .and_then(|i| i.parse::<u64>().ok())
                .map(|i| (FIRST_ORIGINAL + i).to_string())
                .expect("original");
            assert_eq!(
                per_original.get(&original),
                Some(&1),
                "{refund} succeeded unpaid"
            );
        }
    }
    eprintln!(
        "outcomes {counts:?}; executions {}; elapsed {:?}",
        per_original.len(),
        started.elapsed()
    );
    assert_drained(&urls[2], &rig).await;
    refusals(&rig, &replicas).await;
    owners_and_state_travel(&rig, &mut replicas, &balancer, &client, &sandbox).await;

    // A broker node lost for good: more commands are taken and finished.
    eprintln!("SIGKILL broker node 2 for good");
    cluster.nodes[1].kill().expect("kill node");
    let more = commands("rf-cl-after", REFUNDS, 40);
    for body in &more {
        publish(&urls[2..], &mut publisher, body).await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = events
            .lock()
            .expect("lock")
            .keys()
            .filter(|id| id.starts_with("rf-cl-after"))
            .count();
        if done == more.len() {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = (REFUNDS..REFUNDS + more.len())
                .map(|i| format!("rf-cl-after-{i}"))
                .filter(|id| !events.lock().expect("lock").contains_key(id))
                .collect();
            panic!(
                "{done} of {} commands finished after a node was lost\n{}",
                more.len(),
                diagnose(&rig, &cluster, &replicas, &missing).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_drained(&urls[2], &rig).await;
    eprintln!("{} more commands finished with one node gone", more.len());
    let mut executions: BTreeMap<String, usize> = BTreeMap::new();
    for e in sandbox.journal() {
        *executions.entry(e.original_id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "executed twice over the whole run: {twice:?}"
    );
    for replica in &mut replicas {
        rig.kill(replica);
    }
}

/// What a failed wait prints: the refunds without an event, what each live
/// replica's store says about them, every queue of the test's vhost as a
/// live node counts it, and the replicas' log lines that name them (the log
/// file is gone with the machine when CI fails).
async fn diagnose(
    rig: &Rig,
    cluster: &LocalCluster,
    replicas: &[Replica],
    missing: &[String],
) -> String {
    let mut out = format!("refunds without an event: {missing:?}\n");
    for id in missing.iter().take(5) {
        for replica in replicas.iter().filter(|r| r.child.is_some()) {
            let (status, record) = api(
                replica,
                reqwest::Method::GET,
                &format!("/refunds/{id}"),
                None,
            )
            .await;
            out += &format!("{} says {id}: {status} {record}\n", replica.id);
        }
    }
    let vhost = rig
        .urls
        .split(',')
        .next()
        .and_then(|u| u.rsplit('/').next())
        .unwrap_or_default()
        .to_string();
    for node in &cluster.nodes {
        let listed = tokio::task::block_in_place(|| {
            node.ctl_output(&[
                "list_queues",
                "-p",
                &vhost,
                "name",
                "type",
                "leader",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ])
        });
        if let Some(listed) = listed {
            out += &format!("queues as {} sees them:\n{listed}", node.node);
            break;
        }
    }
    let log = std::fs::read_to_string(&rig.log).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| missing.iter().take(5).any(|id| l.contains(id.as_str())))
        .collect();
    out += &format!("log lines naming them ({}):\n", lines.len());
    for line in lines.iter().rev().take(40).rev() {
        out += line;
        out.push('\n');
    }
    // The broker nodes' own logs go with their directories when the test
    // ends; keep a copy next to the replicas' log.
    for node in &cluster.nodes {
        let kept = rig.log.with_extension(format!("{}.broker-log", node.node));
        let _ = std::fs::create_dir_all(&kept);
        if let Ok(files) = std::fs::read_dir(node.dir.join("log")) {
            for file in files.flatten() {
                let _ = std::fs::copy(file.path(), kept.join(file.file_name()));
            }
        }
    }
    out += &format!("(whole log: {}; broker logs beside it)", rig.log.display());
    out
}

/// A free local address for a replica's private listener.
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// The test's load balancer in front of the replicas' callback paths: it
/// passes each callback to a live replica and tries the next one while the
/// answer is 5xx or the replica is down, as a provider retrying a callback
/// would.
#[derive(Clone, Default)]
struct Balancer {
    targets: Arc<Mutex<Vec<String>>>,
    answers: Arc<Mutex<Vec<u16>>>,
}

impl Balancer {
    async fn spawn(&self) -> std::net::SocketAddr {
        use axum::extract::{Request, State};
        async fn pass(
            State(balancer): State<Balancer>,
            request: Request,
        ) -> axum::http::StatusCode {
            let path = request.uri().to_string();
            let body = axum::body::to_bytes(request.into_body(), 1 << 20)
                .await
                .expect("body");
            let client = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut i = 0;
            loop {
                let targets = balancer.targets.lock().expect("lock").clone();
                let target = &targets[i % targets.len()];
                i += 1;
                let answer = client
                    .post(format!("http://{target}{path}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await;
                if let Ok(answer) = answer {
                    let status = answer.status().as_u16();
                    balancer.answers.lock().expect("lock").push(status);
                    if status < 500 || Instant::now() > deadline {
                        return axum::http::StatusCode::from_u16(status).expect("status");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let app = axum::Router::new()
            .fallback(axum::routing::post(pass))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

async fn readyz(replica: &Replica) -> Option<Value> {
    let answer = reqwest::get(format!("http://{}/readyz", replica.http))
        .await
        .ok()?;
    answer.json().await.ok()
}

/// Partitions each live replica owns (`partitions_owned`) or consumes
/// (`partitions_assigned`).
async fn ownership(replicas: &[Replica]) -> BTreeMap<String, Vec<u64>> {
    partitions(replicas, "partitions_owned").await
}

async fn partitions(replicas: &[Replica], which: &str) -> BTreeMap<String, Vec<u64>> {
    let mut owned = BTreeMap::new();
    for replica in replicas.iter().filter(|r| r.child.is_some()) {
        let held = match readyz(replica).await {
            Some(v) => v["cluster"][which]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        owned.insert(replica.id.clone(), held);
    }
    owned
}

async fn api(
    replica: &Replica,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method, format!("http://{}{path}", replica.http))
        .bearer_auth(support::OPERATOR_TOKEN)
        .timeout(Duration::from_secs(20));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let Ok(answer) = request.send().await else {
        return (0, Value::Null);
    };
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// A replica with an id already running, or with another P, refuses to
/// start and says which key.
async fn refusals(rig: &Rig, replicas: &[Replica]) {
    let running = replicas
        .iter()
        .find(|r| r.child.is_some())
        .expect("a live replica");
    for (name, id, partitions, key) in [
        (
            "same id",
            running.id.as_str(),
            PARTITIONS,
            "cluster.replica_id",
        ),
        ("other P", "replica-9", "4", "cluster.partitions"),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let output = tokio::task::spawn_blocking({
            let (config, urls, id, partitions) = (
                rig.config.clone(),
                rig.urls.clone(),
                id.to_string(),
                partitions.to_string(),
            );
            let store = dir.path().join("store");
            move || {
                Command::new(env!("CARGO_BIN_EXE_refund-worker"))
                    .args(["run", "--config"])
                    .arg(config)
                    .args(["--log-format", "text"])
                    .env("REFUND_WORKER__AMQP__URL", urls)
                    .env("REFUND_WORKER__CLUSTER__ENABLED", "true")
                    .env("REFUND_WORKER__CLUSTER__REPLICA_ID", id)
                    .env("REFUND_WORKER__CLUSTER__PARTITIONS", partitions)
                    .env("REFUND_WORKER__STORE__PATH", store)
                    .env("REFUND_WORKER__HTTP__ADDR", "127.0.0.1:0")
                    .output()
                    .expect("run")
            }
        })
        .await
        .expect("task");
        let text = String::from_utf8_lossy(&output.stderr).to_string()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{name}: started anyway");
        assert!(text.contains(key), "{name}: no mention of {key}: {text}");
        eprintln!("{name}: refused ({key})");
    }
}

/// Balance when a replica comes back; a pending Paynet refund whose owner
/// dies is finished by the new owner when Paynet's callback arrives at
/// another replica; operator reads and decisions work from any replica.
async fn owners_and_state_travel(
    rig: &Rig,
    replicas: &mut [Replica],
    balancer: &Balancer,
    client: &Connection,
    sandbox: &Sandbox,
) {
    // replica-3 comes back: within seconds it has its share again.
    rig.spawn(&mut replicas[2], &[]);
    let back = Instant::now();
    loop {
        let owned = partitions(replicas, "partitions_assigned").await;
        let counts: Vec<usize> = owned.values().map(Vec::len).collect();
        let all: BTreeSet<u64> = owned.values().flatten().copied().collect();
        // Nobody above ⌈P/N⌉ + 1, nobody below ⌊P/N⌋, every partition owned.
        if counts.len() == 3
            && all.len() == 8
            && counts
                .iter()
                .all(|c| (8 / 3..=8usize.div_ceil(3) + 1).contains(c))
        {
            eprintln!(
                "balanced {:?} {:?} after replica-3 came back",
                back.elapsed(),
                owned
            );
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "not balanced: {owned:?} (log: {})",
            rig.log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A pending Paynet refund; its owner is killed before Paynet answers.
    let refund_id = "rf-cl-paynet-1";
    let mut body: Value =
        serde_json::from_str(include_str!("../examples/paynet-refund.json")).expect("example");
    body["refund_id"] = refund_id.into();
    let channel = client.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let mut channel_mut = channel;
    publish(&[], &mut channel_mut, &body.to_string()).await;
    let p = refund_worker::store::journal::partition_of(refund_id, 8) as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let owner = loop {
        let (status, record) = api(
            &replicas[0],
            reqwest::Method::GET,
            &format!("/refunds/{refund_id}"),
            None,
        )
        .await;
        if status == 200 && status_of(&record) == "pending" {
            let owned = ownership(replicas).await;
            let owner = owned
                .iter()
                .find(|(_, ps)| ps.contains(&p))
                .map(|(id, _)| id.clone());
            if let Some(owner) = owner {
                break owner;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no pending record on replica-1 (log: {})",
            rig.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let index = replicas.iter().position(|r| r.id == owner).expect("owner");
    *balancer.targets.lock().expect("lock") = replicas
        .iter()
        .filter(|r| r.id != owner)
        .map(|r| r.http.clone())
        .collect();
    eprintln!("SIGKILL {owner}, the owner of pending {refund_id} (partition {p})");
    rig.kill(&mut replicas[index]);
    let killed = Instant::now();
    // Paynet's callback reaches a surviving replica, which hands it to the
    // new owner; every replica then shows the refund succeeded.
    let deadline = Instant::now() + Duration::from_secs(60);
    'settled: loop {
        for replica in replicas.iter().filter(|r| r.child.is_some()) {
            let (status, record) = api(
                replica,
                reqwest::Method::GET,
                &format!("/refunds/{refund_id}"),
                None,
            )
            .await;
            if status == 200 && status_of(&record) == "succeeded" {
                break 'settled;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the callback never settled {refund_id}: answers {:?} (log: {})",
            balancer.answers.lock().expect("lock"),
            rig.log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "settled by the new owner {:?} after the owner's death; callback answers {:?}",
        killed.elapsed(),
        balancer.answers.lock().expect("lock")
    );
    succeeded_everywhere(replicas, refund_id).await;

    // A refund in doubt (Hyp Pay executed it, then answered an HTML page):
    // an operator resolves it through a replica that does not own it, and
    // the owner carries the decision out.
    let refund_id = "rf-cl-doubt-1";
    let original = FIRST_ORIGINAL + REFUND_ORIGINALS as u64 - 1;
    sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: Some(original.to_string()),
        times: 1,
        stall_ms: 0,
    });
    let body = serde_json::json!({
        "refund_id": refund_id,
        "provider": "hyp_pay",
        "transaction": { "id": original.to_string() },
        "amount": { "minor": 1_000, "currency": "ILS" },
    });
    publish(&[], &mut channel_mut, &body.to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, record) = api(
            &replicas[0],
            reqwest::Method::GET,
            &format!("/refunds/{refund_id}"),
            None,
        )
        .await;
        if status_of(&record) == "in_doubt" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refund_id} not in doubt: {record}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = refund_worker::store::journal::partition_of(refund_id, 8) as u64;
    let owned = ownership(replicas).await;
    let asked = replicas
        .iter()
        .filter(|r| r.child.is_some())
        .find(|r| !owned.get(&r.id).is_some_and(|ps| ps.contains(&p)))
        .expect("a replica that does not own the refund");
    let txn = sandbox.journal().last().expect("executed").new_id.clone();
    let (status, answer) = api(
        asked,
        reqwest::Method::POST,
        &format!("/refunds/{refund_id}/resolve"),
        Some(serde_json::json!({"executed": txn, "by": "test", "reason": "seen in the provider's back office"})),
    )
    .await;
    assert_eq!(
        status, 200,
        "resolve via {} (not the owner): {answer}",
        asked.id
    );
    succeeded_everywhere(replicas, refund_id).await;
    eprintln!("resolved {refund_id} through {} (not its owner)", asked.id);
}

/// `pending`, `in_doubt`, ... or the final status of a finished record.
fn status_of(record: &Value) -> String {
    let state = &record["state"];
    match state["state"].as_str() {
        Some("finished") => state["event"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        other => other.unwrap_or_default().to_string(),
    }
}

/// The commands queue and every partition queue are empty (soon).
async fn assert_drained(url: &str, rig: &Rig) {
    let probe = connect(url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ch = probe.create_channel().await.expect("channel");
        let mut left = depth(&ch, "refunds.commands").await;
        for p in 0..8 {
            left = left.saturating_add(depth(&ch, &format!("refunds.commands.p.{p}")).await);
        }
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} commands left in queues (log: {})",
            rig.log.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every live replica shows `refund_id` succeeded (soon): the state log
/// reached each one's store.
async fn succeeded_everywhere(replicas: &[Replica], refund_id: &str) {
    for replica in replicas.iter().filter(|r| r.child.is_some()) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = format!("/refunds/{refund_id}");
            let (_, record) = api(replica, reqwest::Method::GET, &path, None).await;
            if status_of(&record) == "succeeded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not show {refund_id} succeeded: {record}",
                replica.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
