//! `refund-worker bench --replicas N`: cluster mode on a private 3-node
//! RabbitMQ cluster (or `--amqp-url` with every node's URL).
//!
//! For each provider latency and prefetch it drains N commands three ways:
//! one worker in single-node mode, one replica in cluster mode, and N
//! replicas in cluster mode (each a child process of this binary with its
//! own store), all on the same cluster. Latency-bound settings show the
//! balance (N replicas should approach N times one); the single-node run
//! shows what cluster mode costs a replica. Then the takeover: N replicas
//! drain, one is killed with SIGKILL a third of the way, and the time until
//! the first refund of its partitions is finished by another replica is
//! reported.

use super::{bench_settings, bind_events, collect, cpu_ms, free_port, preload, BenchOptions};
use crate::broker::topology;
use crate::local_cluster::LocalCluster;
use crate::sandbox::Sandbox;
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Partitions in every benchmark deployment.
const PARTITIONS: u32 = 16;

/// One drain.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRun {
    /// `single-node` or `cluster`.
    pub mode: &'static str,
    /// Worker processes.
    pub replicas: usize,
    /// Provider latency (ms).
    pub latency_ms: u64,
    /// `amqp.prefetch` (per replica).
    pub prefetch: u16,
    /// Messages per second, first to last event.
    pub msgs_per_sec: f64,
    /// CPU of all workers per refund (ms).
    pub cpu_ms_per_msg: f64,
    /// Publish-to-event p50 (ms).
    pub p50_ms: f64,
}

/// The takeover measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Takeover {
    /// The partitions the killed replica owned.
    pub partitions: Vec<u32>,
    /// From the SIGKILL to the first refund of those partitions finished
    /// by another replica (s).
    pub seconds: f64,
}

/// Everything `--replicas` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaReport {
    /// Runs.
    pub runs: Vec<ReplicaRun>,
    /// Takeover, if measured.
    pub takeover: Option<Takeover>,
}

/// Runs the cluster benchmark with `replicas` replicas.
pub async fn run(options: &BenchOptions, replicas: usize) -> anyhow::Result<ReplicaReport> {
    let _cluster;
    let urls = match &options.amqp_url {
        Some(urls) => urls.clone(),
        None => {
            eprintln!("starting a private 3-node RabbitMQ cluster (about 30 s)...");
            let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(3)).await??;
            let urls = cluster.vhost()?;
            _cluster = cluster;
            urls
        }
    };
    let first = urls.split(',').next().unwrap_or_default().to_string();
    let connection = Connection::connect(&first, ConnectionProperties::default()).await?;
    let mut runs = Vec::new();
    let mut id = 0;
    for &latency_ms in &options.latency_ms {
        for &prefetch in &options.prefetch {
            for (mode, count) in [("single-node", 1), ("cluster", 1), ("cluster", replicas)] {
                id += 1;
                let run = drain(
                    options,
                    &connection,
                    &urls,
                    id,
                    mode,
                    count,
                    latency_ms,
                    prefetch,
                )
                .await?;
                eprintln!(
                    "{mode:>11} × {count}  {latency_ms:>3} ms  prefetch {prefetch:>3}: {:>8.0} msg/s  {:.3} CPU ms/refund",
                    run.msgs_per_sec, run.cpu_ms_per_msg
                );
                runs.push(run);
            }
        }
    }
    id += 1;
    let latency = options.latency_ms.first().copied().unwrap_or(50);
    let prefetch = options.prefetch.first().copied().unwrap_or(64);
    let takeover = takeover(options, &connection, &urls, id, replicas, latency, prefetch).await?;
    eprintln!(
        "takeover: partitions {:?} finished elsewhere {:.1} s after their owner's SIGKILL",
        takeover.partitions, takeover.seconds
    );
    let _ = connection.close(200, "bench done".into()).await;
    let report = ReplicaReport {
        runs,
        takeover: Some(takeover),
    };
    print(&report, replicas);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

/// One deployment of a benchmark run: its names, sandbox, stores.
struct Deployment {
    settings: crate::config::Settings,
    configs: Vec<(PathBuf, u16)>,
    _sandbox: Sandbox,
    dir: tempfile::TempDir,
}

#[allow(clippy::too_many_arguments)]
async fn deploy(
    connection: &Connection,
    urls: &str,
    id: usize,
    cluster: bool,
    count: usize,
    latency_ms: u64,
    prefetch: u16,
    n: usize,
) -> anyhow::Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let (sandbox, sandbox_url) = super::sandbox(latency_ms, n).await?;
    let run = format!("{id}c");
    let mut configs = Vec::new();
    let mut settings = None;
    for i in 0..count {
        let store = dir.path().join(format!("store-{i}"));
        let port = free_port()?;
        let mut s = bench_settings(urls, &run, prefetch, &store, port, &sandbox_url)?;
        s.cluster.enabled = cluster;
        s.cluster.partitions = u64::from(PARTITIONS);
        configs.push((store.with_extension("toml"), port));
        settings.get_or_insert(s);
    }
    let settings = settings.ok_or_else(|| anyhow::anyhow!("no replica"))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology::declare(&channel, &settings).await?;
    if cluster {
        crate::cluster::declare(connection, &settings).await?;
    }
    Ok(Deployment {
        settings,
        configs,
        _sandbox: sandbox,
        dir,
    })
}

fn spawn(exe: &Path, config: &Path, log: &Path, cluster: bool, i: usize) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = Command::new(exe);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if cluster {
        command
            .env("REFUND_WORKER__CLUSTER__ENABLED", "true")
            .env("REFUND_WORKER__CLUSTER__REPLICA_ID", format!("bench-{i}"))
            .env("REFUND_WORKER__CLUSTER__PARTITIONS", PARTITIONS.to_string());
    }
    Ok(command.spawn()?)
}

fn stop(children: Vec<Child>) {
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    options: &BenchOptions,
    connection: &Connection,
    urls: &str,
    id: usize,
    mode: &'static str,
    count: usize,
    latency_ms: u64,
    prefetch: u16,
) -> anyhow::Result<ReplicaRun> {
    let n = options.n;
    let cluster = mode == "cluster";
    let deployment = deploy(
        connection, urls, id, cluster, count, latency_ms, prefetch, n,
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let events = bind_events(&channel, &deployment.settings.amqp.events_exchange).await?;
    preload(
        &channel,
        &deployment.settings.amqp.commands_exchange,
        n,
        &format!("c{id}"),
    )
    .await?;
    let log = deployment.dir.path().join("workers.log");
    let mut children = Vec::new();
    for (i, (config, _)) in deployment.configs.iter().enumerate() {
        children.push(spawn(&options.worker_exe, config, &log, cluster, i)?);
    }
    let label = format!("{mode} × {count}  {latency_ms:>3} ms  prefetch {prefetch:>3}");
    let drained = collect(events, n, &label, options.quiet).await;
    let cpu: f64 = children.iter().map(|c| cpu_ms(c.id())).sum();
    stop(children);
    let drained = drained.map_err(|e| anyhow::anyhow!("{e} (log: {})", log.display()))?;
    let _ = channel.close(200, "run done".into()).await;
    Ok(ReplicaRun {
        mode,
        replicas: count,
        latency_ms,
        prefetch,
        msgs_per_sec: drained.msgs_per_sec,
        cpu_ms_per_msg: cpu / n as f64,
        p50_ms: drained.p50_ms,
    })
}

async fn takeover(
    options: &BenchOptions,
    connection: &Connection,
    urls: &str,
    id: usize,
    count: usize,
    latency_ms: u64,
    prefetch: u16,
) -> anyhow::Result<Takeover> {
    let n = options.n;
    let deployment = deploy(connection, urls, id, true, count, latency_ms, prefetch, n).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut events = bind_events(&channel, &deployment.settings.amqp.events_exchange).await?;
    preload(
        &channel,
        &deployment.settings.amqp.commands_exchange,
        n,
        &format!("t{id}"),
    )
    .await?;
    let log = deployment.dir.path().join("workers.log");
    let mut children = Vec::new();
    for (i, (config, _)) in deployment.configs.iter().enumerate() {
        children.push(spawn(&options.worker_exe, config, &log, true, i)?);
    }
    let victim = count.saturating_sub(1).min(1);
    let mut seen = 0;
    let mut killed: Option<(Instant, Vec<u32>)> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let result = loop {
        let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(60), events.next()).await
        else {
            break Err(anyhow::anyhow!(
                "events stopped after {seen} (log: {})",
                log.display()
            ));
        };
        seen += 1;
        if killed.is_none() && seen >= n / 3 {
            let port = deployment.configs[victim].1;
            let owned = owned_partitions(port).await;
            let _ = children[victim].kill();
            let _ = children[victim].wait();
            killed = Some((Instant::now(), owned));
            continue;
        }
        if let Some((at, owned)) = &killed {
            let event: serde_json::Value =
                serde_json::from_slice(&delivery.data).unwrap_or_default();
            let refund = event["refund_id"].as_str().unwrap_or_default();
            let p = crate::store::journal::partition_of(refund, PARTITIONS);
            if owned.contains(&p) && at.elapsed() > Duration::from_millis(1) {
                break Ok(Takeover {
                    partitions: owned.clone(),
                    seconds: at.elapsed().as_secs_f64(),
                });
            }
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("no takeover seen"));
        }
    };
    stop(children);
    let _ = channel.close(200, "run done".into()).await;
    result
}

async fn owned_partitions(port: u16) -> Vec<u32> {
    let Ok(answer) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await else {
        return Vec::new();
    };
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    body["cluster"]["partitions_owned"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().and_then(|p| u32::try_from(p).ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn print(report: &ReplicaReport, replicas: usize) {
    println!(
        "refund-worker bench --replicas {replicas}, {} ({})",
        crate::event::now_rfc3339(),
        super::machine_description()
    );
    println!("| mode | replicas | latency | prefetch | msg/s | CPU ms/refund | p50 ms |");
    println!("|---|---|---|---|---|---|---|");
    for r in &report.runs {
        println!(
            "| {} | {} | {} ms | {} | {:.0} | {:.3} | {:.0} |",
            r.mode,
            r.replicas,
            r.latency_ms,
            r.prefetch,
            r.msgs_per_sec,
            r.cpu_ms_per_msg,
            r.p50_ms
        );
    }
    for (latency, prefetch) in report
        .runs
        .iter()
        .map(|r| (r.latency_ms, r.prefetch))
        .collect::<std::collections::BTreeSet<_>>()
    {
        let of = |mode: &str, count: usize| {
            report
                .runs
                .iter()
                .find(|r| {
                    r.mode == mode
                        && r.replicas == count
                        && r.latency_ms == latency
                        && r.prefetch == prefetch
                })
                .map(|r| r.msgs_per_sec)
                .unwrap_or(0.0)
        };
        let (single, one, many) = (
            of("single-node", 1),
            of("cluster", 1),
            of("cluster", replicas),
        );
        if one > 0.0 && single > 0.0 {
            println!(
                "{latency} ms, prefetch {prefetch}: {replicas} replicas = {:.2} × one replica (target ≥ 2.4 at 200 ms); one replica in cluster mode = {:.2} × single-node (target ≥ 0.7)",
                many / one,
                one / single
            );
        }
    }
    if let Some(t) = &report.takeover {
        println!(
            "takeover after SIGKILL: {:.1} s (target ≤ 10 s), partitions {:?}",
            t.seconds, t.partitions
        );
    }
}
