//! `refund-worker bench --backend postgres --replicas N`: replicas sharing a
//! private PostgreSQL server, on a private RabbitMQ node (or `--amqp-url`).
//!
//! Three measurements, each on fresh queues and a fresh database:
//!
//! * **PostgreSQL against sled** at 0 ms provider latency: one replica on
//!   PostgreSQL and one worker on sled drain the same N refunds (the cost
//!   of a shared store; goal: at least 0.6 times sled's rate);
//! * **scaling** at the first `--latency-ms` above 0 (200 ms by default):
//!   one replica, then N replicas (goal: N = 3 at least 2.6 times one);
//! * **a replica killed** (SIGKILL) a third of the way into an N-replica
//!   drain: the refunds then in doubt against the provider calls it had
//!   under way (its `refund_worker_in_flight` just before the kill).
//!
//! Each drain reports the workers' CPU per refund, the database server's
//! CPU per refund and its commits per refund (`pg_stat_database`).

use super::{bench_settings, bind_events, collect, cpu_ms, free_port, preload, BenchOptions};
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use refund_testkit::local_broker::LocalBroker;
use refund_testkit::local_postgres::LocalPostgres;
use refund_worker::broker::topology;
use refund_worker::config::StoreBackend;
use serde::Serialize;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One drain.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRun {
    /// `sled` or `postgres`.
    pub backend: &'static str,
    /// Worker processes.
    pub replicas: usize,
    /// Provider latency (ms).
    pub latency_ms: u64,
    /// `amqp.prefetch` per replica.
    pub prefetch: u16,
    /// Refunds drained.
    pub n: usize,
    /// Refunds per second, first to last event.
    pub msgs_per_sec: f64,
    /// CPU of every worker process per refund (ms).
    pub worker_cpu_ms_per_msg: f64,
    /// CPU of the database server's processes per refund (ms).
    pub database_cpu_ms_per_msg: f64,
    /// Database transactions per refund (`xact_commit`: every statement
    /// outside a transaction counts, reads too).
    pub commits_per_msg: f64,
    /// WAL syncs per refund (`pg_stat_wal.wal_sync`): the durable commits'
    /// disk cost, shared by concurrent commits.
    pub wal_syncs_per_msg: f64,
    /// Publish-to-event p50 (ms).
    pub p50_ms: f64,
}

/// A replica killed mid-drain.
#[derive(Debug, Clone, Serialize)]
pub struct KillRun {
    /// Replicas at the start.
    pub replicas: usize,
    /// Provider calls the killed replica had under way just before.
    pub killed_in_flight: u64,
    /// Refunds whose outcome is `in_doubt`.
    pub in_doubt: usize,
    /// Refunds the sandbox executed more than once (must be 0).
    pub paid_twice: usize,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaReport {
    /// The drains.
    pub runs: Vec<ReplicaRun>,
    /// The kill.
    pub kill: Option<KillRun>,
}

/// What a drain runs on.
struct Rig<'a> {
    options: &'a BenchOptions,
    amqp_url: String,
    channel: Channel,
    server: &'a LocalPostgres,
    dir: tempfile::TempDir,
    runs: usize,
}

/// Runs the three measurements with `replicas` replicas.
pub async fn run(options: &BenchOptions, replicas: usize) -> anyhow::Result<ReplicaReport> {
    let _node;
    let amqp_url = match &options.amqp_url {
        Some(url) => url.clone(),
        None => {
            eprintln!("starting a private RabbitMQ node...");
            let node = tokio::task::spawn_blocking(LocalBroker::start).await??;
            let url = node.vhost()?;
            _node = node;
            url
        }
    };
    eprintln!("starting a private PostgreSQL server...");
    let server = tokio::task::spawn_blocking(LocalPostgres::start).await??;
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut rig = Rig {
        options,
        amqp_url,
        channel,
        server: &server,
        dir: tempfile::tempdir()?,
        runs: 0,
    };
    let prefetch = options.prefetch.first().copied().unwrap_or(64);
    let latency = options
        .latency_ms
        .iter()
        .copied()
        .find(|l| *l > 0)
        .unwrap_or(200);
    let mut runs = Vec::new();
    for (backend, count, latency_ms) in [
        (StoreBackend::Sled, 1, 0),
        (StoreBackend::Postgres, 1, 0),
        (StoreBackend::Postgres, 1, latency),
        (StoreBackend::Postgres, replicas, latency),
    ] {
        let run = rig.drain(backend, count, latency_ms, prefetch).await?;
        eprintln!(
            "{} x{}: {:.0} refunds/s at {} ms, {:.3} worker CPU ms, {:.3} database CPU ms, {:.2} transactions, {:.2} WAL syncs per refund",
            run.backend, run.replicas, run.msgs_per_sec, run.latency_ms,
            run.worker_cpu_ms_per_msg, run.database_cpu_ms_per_msg, run.commits_per_msg,
            run.wal_syncs_per_msg
        );
        runs.push(run);
    }
    let kill = rig.kill(replicas.max(2), latency, prefetch).await?;
    eprintln!(
        "killed one of {}: {} calls under way, {} in doubt, {} paid twice",
        kill.replicas, kill.killed_in_flight, kill.in_doubt, kill.paid_twice
    );
    let _ = connection.close(200, "bench done".into()).await;
    server.stop();
    let report = ReplicaReport {
        runs,
        kill: Some(kill),
    };
    print_replicas(&report);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

/// Worker processes of one drain.
struct Workers {
    children: Vec<(Child, u16)>,
    database: Option<String>,
}

impl Rig<'_> {
    /// Fresh queue names and settings for `count` workers; their config
    /// files are written next to their stores.
    async fn prepare(
        &mut self,
        backend: StoreBackend,
        count: usize,
        latency_ms: u64,
        prefetch: u16,
    ) -> anyhow::Result<(Workers, lapin::Consumer, refund_sandbox::Sandbox)> {
        self.runs += 1;
        let n = self.options.n;
        let (sandbox, sandbox_url) = super::sandbox(latency_ms, n).await?;
        let name = format!("r{}", self.runs);
        let database = match backend {
            StoreBackend::Postgres => Some(self.server.database()?),
            StoreBackend::Sled => None,
        };
        let mut workers = Workers {
            children: Vec::new(),
            database: database.clone(),
        };
        let mut events = None;
        for i in 0..count {
            let store = self.dir.path().join(format!("store-{name}-{i}"));
            let port = free_port()?;
            let mut settings =
                bench_settings(&self.amqp_url, &name, prefetch, &store, port, &sandbox_url)?;
            settings.store.backend = backend;
            if i == 0 {
                topology::declare(&self.channel, &settings).await?;
                events = Some(bind_events(&self.channel, &settings.amqp.events_exchange).await?);
                preload(
                    &self.channel,
                    &settings.amqp.commands_exchange,
                    n,
                    &format!("b{name}"),
                )
                .await?;
            }
            let child = self.spawn(&store, backend, database.as_deref(), &name, i)?;
            workers.children.push((child, port));
        }
        let events = events.ok_or_else(|| anyhow::anyhow!("no worker"))?;
        Ok((workers, events, sandbox))
    }

    fn spawn(
        &self,
        store: &Path,
        backend: StoreBackend,
        database: Option<&str>,
        name: &str,
        i: usize,
    ) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.dir.path().join(format!("worker-{name}-{i}.log")))?;
        let mut command = Command::new(&self.options.worker_exe);
        command
            .arg("run")
            .arg("--config")
            .arg(store.with_extension("toml"));
        if let (StoreBackend::Postgres, Some(url)) = (backend, database) {
            command
                .env("REFUND_WORKER__STORE__BACKEND", "postgres")
                .env("REFUND_WORKER__STORE__POSTGRES__URL", url);
        }
        Ok(command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }

    async fn drain(
        &mut self,
        backend: StoreBackend,
        count: usize,
        latency_ms: u64,
        prefetch: u16,
    ) -> anyhow::Result<ReplicaRun> {
        let (mut workers, events, _sandbox) =
            self.prepare(backend, count, latency_ms, prefetch).await?;
        let before = self.database_counters(workers.database.as_deref()).await;
        let label = format!("{count} x {backend:?} {latency_ms} ms");
        let drain = collect(events, self.options.n, &label, self.options.quiet).await?;
        let worker_cpu: f64 = workers.children.iter().map(|(c, _)| cpu_ms(c.id())).sum();
        let cpu_after = server_cpu_ms(&self.server.dir.join("data"));
        // The workers' sessions report their statistics as they end.
        stop(&mut workers).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut after = self.database_counters(workers.database.as_deref()).await;
        after.0 = cpu_after;
        let n = self.options.n as f64;
        Ok(ReplicaRun {
            backend: match backend {
                StoreBackend::Sled => "sled",
                StoreBackend::Postgres => "postgres",
            },
            replicas: count,
            latency_ms,
            prefetch,
            n: self.options.n,
            msgs_per_sec: drain.msgs_per_sec,
            worker_cpu_ms_per_msg: worker_cpu / n,
            database_cpu_ms_per_msg: (after.0 - before.0) / n,
            commits_per_msg: (after.1 - before.1) / n,
            wal_syncs_per_msg: (after.2 - before.2) / n,
            p50_ms: drain.p50_ms,
        })
    }

    /// The database server's CPU (ms, every process of it), the
    /// database's transactions and the server's WAL syncs so far.
    async fn database_counters(&self, database: Option<&str>) -> (f64, f64, f64) {
        let Some(url) = database else {
            return (0.0, 0.0, 0.0);
        };
        let cpu = server_cpu_ms(&self.server.dir.join("data"));
        let commits = async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(connection);
            let row = client
                .query_one(
                    "SELECT xact_commit, (SELECT wal_sync FROM pg_stat_wal) \
                     FROM pg_stat_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .ok()?;
            Some((row.get::<_, i64>(0) as f64, row.get::<_, i64>(1) as f64))
        }
        .await
        .unwrap_or((0.0, 0.0));
        (cpu, commits.0, commits.1)
    }

    async fn kill(
        &mut self,
        count: usize,
        latency_ms: u64,
        prefetch: u16,
    ) -> anyhow::Result<KillRun> {
        let (mut workers, mut events, sandbox) = self
            .prepare(StoreBackend::Postgres, count, latency_ms, prefetch)
            .await?;
        let n = self.options.n;
        let mut statuses = std::collections::BTreeMap::new();
        let mut killed_in_flight = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        while statuses.len() < n && Instant::now() < deadline {
            if killed_in_flight.is_none() && statuses.len() >= n / 3 {
                let (child, port) = &mut workers.children[0];
                let metrics = super::scrape(*port).await;
                killed_in_flight = Some(super::counter(&metrics, "refund_worker_in_flight") as u64);
                let _ = child.kill();
            }
            let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_secs(60), events.next()).await
            else {
                break;
            };
            let v: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            let id = v["refund_id"].as_str().unwrap_or_default().to_string();
            let status = v["status"].as_str().unwrap_or_default().to_string();
            if status == "succeeded" || !statuses.contains_key(&id) {
                statuses.insert(id, status);
            }
        }
        stop(&mut workers).await;
        let mut executed = std::collections::BTreeMap::new();
        for e in sandbox.journal() {
            *executed.entry(e.original_id).or_insert(0usize) += 1;
        }
        Ok(KillRun {
            replicas: count,
            killed_in_flight: killed_in_flight.unwrap_or(0),
            in_doubt: statuses.values().filter(|s| *s == "in_doubt").count(),
            paid_twice: executed.values().filter(|c| **c > 1).count(),
        })
    }
}

async fn stop(workers: &mut Workers) {
    for (child, _) in &mut workers.children {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    for (mut child, _) in workers.children.drain(..) {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
}

/// CPU (ms) of the server whose data directory is `data`: the postmaster
/// (first line of `postmaster.pid`) and its children.
fn server_cpu_ms(data: &Path) -> f64 {
    let Some(main) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return 0.0;
    };
    let mut total = cpu_ms(main);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let after = s.rsplit_once(')')?.1.to_string();
                after.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent == Some(main) {
            total += cpu_ms(pid);
        }
    }
    total
}

fn print_replicas(report: &ReplicaReport) {
    println!("| backend | replicas | latency | refunds/s | worker CPU ms | database CPU ms | transactions | WAL syncs |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &report.runs {
        println!(
            "| {} | {} | {} ms | {:.0} | {:.3} | {:.3} | {:.2} | {:.2} |",
            r.backend,
            r.replicas,
            r.latency_ms,
            r.msgs_per_sec,
            r.worker_cpu_ms_per_msg,
            r.database_cpu_ms_per_msg,
            r.commits_per_msg,
            r.wal_syncs_per_msg
        );
    }
    let rate = |backend: &str, replicas: usize, zero: bool| {
        report
            .runs
            .iter()
            .find(|r| r.backend == backend && r.replicas == replicas && (r.latency_ms == 0) == zero)
            .map(|r| r.msgs_per_sec)
    };
    if let (Some(pg), Some(sled)) = (rate("postgres", 1, true), rate("sled", 1, true)) {
        println!("postgres / sled at 0 ms: {:.2} (goal >= 0.6)", pg / sled);
    }
    let many = report
        .runs
        .iter()
        .filter(|r| r.latency_ms > 0)
        .map(|r| r.replicas)
        .max();
    if let (Some(many), Some(one)) = (many, rate("postgres", 1, false)) {
        if let Some(all) = rate("postgres", many, false) {
            println!(
                "{many} replicas / one: {:.2} (goal for 3: >= 2.6)",
                all / one
            );
        }
    }
    if let Some(k) = &report.kill {
        println!(
            "killed one of {}: {} calls under way, {} in doubt, {} paid twice",
            k.replicas, k.killed_in_flight, k.in_doubt, k.paid_twice
        );
    }
}
