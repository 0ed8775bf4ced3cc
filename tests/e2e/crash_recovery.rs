//! Crash recovery with the real binary: hundreds of commands (duplicates
//! mixed in) against a sandbox with latency, the worker killed with SIGKILL
//! several times at arbitrary moments and restarted on the same store. At the
//! end every refund has exactly one final outcome, the sandbox executed no
//! refund twice, and the commands queue is empty.

use crate::support;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use refund_sandbox::{Sandbox, SandboxConfig, Seed};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::broker::RabbitNode;

const REFUNDS: usize = 300;
const DUPLICATED: usize = 60;
const KILLS: usize = 4;

fn spawn_worker(config: &std::path::Path, log: &std::path::Path) -> Child {
    spawn_worker_with(config, log, &[])
}

fn spawn_worker_with(
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("worker binary")
}

/// What a crash test runs against: its own vhost, a sandbox with `n`
/// originals from `first_id` and a latency, a store directory and a worker
/// config file.
struct Rig {
    amqp_url: String,
    sandbox: Sandbox,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    settings: refund_worker::config::Settings,
}

async fn rig(first_id: u64, n: usize, latency_ms: u64) -> Rig {
    let amqp_url = tokio::task::spawn_blocking(|| RabbitNode::shared().vhost())
        .await
        .expect("vhost");
    let sandbox = Sandbox::new(SandboxConfig {
        latency: Duration::from_millis(latency_ms),
        seed: Seed::hyp_pay_range(first_id, n, 10_000),
        ..SandboxConfig::default()
    });
    let sandbox_url = format!(
        "http://{}",
        sandbox.spawn("127.0.0.1:0").await.expect("sandbox")
    );
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("store");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        support::settings_layer(&amqp_url, &store, &sandbox_url),
    )
    .expect("config");
    let settings = support::test_settings(&amqp_url, &store, &sandbox_url);
    let log = dir.path().join("worker.log");
    Rig {
        amqp_url,
        sandbox,
        dir,
        config,
        log,
        settings,
    }
}

/// `n` Hyp Pay refund commands `{prefix}-{i}` on originals `first_id + i`.
fn commands(prefix: &str, first_id: u64, n: usize, minor: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "refund_id": format!("{prefix}-{i}"),
                "provider": "hyp_pay",
                "transaction": { "id": (first_id + i as u64).to_string() },
                "amount": { "minor": minor, "currency": "ILS" },
            })
            .to_string()
        })
        .collect()
}

/// Publishes each body as a persistent command and waits for its confirm.
async fn publish_all(channel: &lapin::Channel, bodies: impl Iterator<Item = &String>) {
    for body in bodies {
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
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
}

/// A pseudo-random number from the clock: good enough to vary kill times.
fn jitter_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_pays_twice_or_loses_one() {
    let Rig {
        amqp_url,
        sandbox,
        dir: _dir,
        config,
        log,
        settings,
    } = rig(70_000_000, REFUNDS, 300).await;
    // Our event queue and publisher, bound before anything is published.
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let mut worker = spawn_worker(&config, &log);
    // Wait for the worker to declare the topology (a failed passive declare
    // closes its channel, so each probe gets a fresh one).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = connection.create_channel().await.expect("probe channel");
        if probe
            .queue_declare(
                "refunds.commands".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker never declared the topology (log: {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_events_connection, channel, mut events) =
        support::test_client(&amqp_url, &settings).await;

    let bodies = commands("rf-crash", 70_000_000, REFUNDS, 2_500);
    let duplicates = &bodies[..DUPLICATED];
    publish_all(&channel, bodies.iter().chain(duplicates)).await;

    // Collect events in the background while we kill and restart.
    let collector = tokio::spawn(async move {
        let mut by_refund: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
        let finals = |m: &BTreeMap<String, BTreeSet<(String, String)>>| m.len();
        let deadline = Instant::now() + Duration::from_secs(240);
        while finals(&by_refund) < REFUNDS && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
                Ok(Some(Ok(d))) => {
                    let v: Value = serde_json::from_slice(&d.data).expect("event json");
                    let id = v["refund_id"].as_str().unwrap_or_default().to_string();
                    let status = v["status"].as_str().unwrap_or_default().to_string();
                    let event_id = v["event_id"].as_str().unwrap_or_default().to_string();
                    by_refund.entry(id).or_default().insert((status, event_id));
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        by_refund
    });

    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(150 + jitter_ms(300))).await;
        worker.kill().expect("kill -9");
        let _ = worker.wait();
        eprintln!(
            "killed the worker (round {round}); executions so far: {}",
            sandbox.journal().len()
        );
        worker = spawn_worker(&config, &log);
    }

    let by_refund = collector.await.expect("collector");
    // Let the last worker settle, then stop it gracefully.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status();
    let _ = worker.wait();

    assert_eq!(
        by_refund.len(),
        REFUNDS,
        "every refund has an outcome (log: {})",
        log.display()
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (refund_id, outcomes) in &by_refund {
        assert_eq!(
            outcomes.len(),
            1,
            "{refund_id} has one final outcome, got {outcomes:?}"
        );
        let (status, _) = outcomes.iter().next().expect("one");
        assert!(
            ["succeeded", "in_doubt"].contains(&status.as_str()),
            "{refund_id}: {status}"
        );
        *counts.entry(status.clone()).or_default() += 1;
    }
    let journal = sandbox.journal();
    let mut per_original: BTreeMap<String, usize> = BTreeMap::new();
    for e in &journal {
        *per_original.entry(e.original_id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_original.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "refunds executed twice: {twice:?}");
    // Every succeeded refund was executed; in-doubt ones at most once.
    let succeeded = counts.get("succeeded").copied().unwrap_or(0);
    assert!(
        journal.len() >= succeeded,
        "{} executions for {succeeded} successes",
        journal.len()
    );
    let depth = channel
        .queue_declare(
            "refunds.commands".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("depth")
        .message_count();
    assert_eq!(depth, 0, "commands left in the queue");
    eprintln!("outcomes: {counts:?}; executions: {}", journal.len());
}

/// SIGTERM while refunds are in flight: the worker stops taking deliveries,
/// finishes the ones it has, syncs and exits 0. Nothing ends in doubt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_refunds_before_exiting() {
    const N: usize = 40;
    let Rig {
        amqp_url,
        sandbox,
        dir: _dir,
        config,
        log,
        settings,
    } = rig(60_000_000, N, 800).await;
    // Declare the topology and our event queue before the worker runs, so
    // commands wait in the queue for it.
    let (_conn, channel, mut events) = support::test_client(&amqp_url, &settings).await;
    let (_topology_conn, topology_channel, _) = support::test_client(&amqp_url, &settings).await;
    refund_worker::broker::topology::declare(&topology_channel, &settings)
        .await
        .expect("topology");
    publish_all(&channel, commands("rf-term", 60_000_000, N, 100).iter()).await;
    let prefetch = [("REFUND_WORKER__AMQP__PREFETCH", "8")];
    let mut worker = spawn_worker_with(&config, &log, &prefetch);
    // Wait until the sandbox sees requests, then ask the worker to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandbox.requests() == 0 {
        assert!(Instant::now() < deadline, "no provider request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status();
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        status.success(),
        "clean exit, got {status:?} (log: {})",
        log.display()
    );
    let executed = sandbox.journal().len();
    assert!(
        executed > 0 && executed < N,
        "stopped mid-run ({executed} executed)"
    );

    // Restart: the rest are processed; nothing is in doubt.
    let mut worker = spawn_worker_with(&config, &log, &prefetch);
    let mut outcomes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes.len() < N && Instant::now() < deadline {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
            let v: Value = serde_json::from_slice(&d.data).expect("json");
            outcomes
                .entry(v["refund_id"].as_str().unwrap_or_default().to_string())
                .or_default()
                .insert(v["status"].as_str().unwrap_or_default().to_string());
        }
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status();
    let _ = worker.wait();
    assert_eq!(outcomes.len(), N);
    for (id, statuses) in &outcomes {
        assert_eq!(
            statuses.iter().collect::<Vec<_>>(),
            vec!["succeeded"],
            "{id}"
        );
    }
    assert_eq!(sandbox.journal().len(), N);
}
