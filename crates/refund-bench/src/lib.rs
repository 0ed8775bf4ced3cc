//! `refund-bench`: how fast the worker drains a queue, compared with
//! the fastest thing the same broker can do in the same run.
//!
//! For each configuration (provider latency × prefetch) it preloads N
//! commands (persistent, confirmed), then drains them twice: with the real
//! worker (this binary's `run`, as a child process, on a fresh store, against
//! the in-process sandbox with the set latency) and with a baseline relay
//! (consume → publish a small persistent event with confirms → ack after the
//! confirm; no store, no HTTP). The ratio of the two is the figure that
//! means something on any machine.

pub mod plot;
pub mod pressure;
pub mod relay;
pub mod replicas;
pub mod tombstones;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use refund_sandbox::{Sandbox, SandboxConfig, Seed};
use refund_testkit::local_broker::LocalBroker;
use refund_worker::broker::topology;
use refund_worker::config::{Settings, DEFAULT_TOML};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Commands per drain.
    pub n: usize,
    /// Prefetch values to sweep.
    pub prefetch: Vec<u16>,
    /// Provider latencies to sweep (ms).
    pub latency_ms: Vec<u64>,
    /// Use this broker instead of starting a private node.
    pub amqp_url: Option<String>,
    /// Write the results here as JSON.
    pub json: Option<PathBuf>,
    /// Write the plot here (SVG).
    pub plot: Option<PathBuf>,
    /// No progress bar.
    pub quiet: bool,
    /// The worker binary (normally this executable).
    pub worker_exe: PathBuf,
    /// Run the pressure scenarios (burst, outage) instead of the sweep.
    pub pressure: Option<PressureOptions>,
    /// Worker and relay drains per configuration, taking turns.
    pub rounds: usize,
}

/// The pressure scenarios' sizes.
#[derive(Debug, Clone)]
pub struct PressureOptions {
    /// Refunds of the limited account in the burst.
    pub burst: usize,
    /// How long the provider is down in the outage.
    pub outage: Duration,
}

/// One drain's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    /// Messages per second, first to last event.
    pub msgs_per_sec: f64,
    /// Publish-to-event latency percentiles (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Worst (ms).
    pub max_ms: f64,
    /// Seconds from first to last event.
    pub seconds: f64,
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    /// Provider latency (ms).
    pub latency_ms: u64,
    /// basic.qos prefetch.
    pub prefetch: u16,
    /// Commands drained.
    pub n: usize,
    /// The worker.
    pub worker: Drain,
    /// The baseline relay.
    pub relay: Drain,
    /// worker ÷ relay throughput (the round with the median ratio).
    pub ratio: f64,
    /// The lowest and highest ratio over the rounds.
    pub ratio_range: (f64, f64),
    /// prefetch ÷ latency: the most the worker can do when every message
    /// waits `latency` at the provider (Little's law); `None` at 0 ms.
    pub littles_law_msgs_per_sec: Option<f64>,
    /// Peak resident set size of the worker process (MiB).
    pub worker_peak_rss_mib: f64,
    /// CPU time (user + system) the worker process used per message (ms):
    /// where its time goes, next to the relay's wall-clock budget.
    pub worker_cpu_ms_per_msg: f64,
    /// The same for the relay process.
    pub relay_cpu_ms_per_msg: f64,
    /// Store flushes per message.
    pub syncs_per_message: f64,
    /// Processing time per refund (arrival in the pipeline to ack), p50 (ms).
    pub processing_p50_ms: f64,
    /// p99 (ms).
    pub processing_p99_ms: f64,
    /// Every round.
    pub rounds: Vec<Round>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// When (RFC 3339).
    pub date: String,
    /// `nproc`, memory, kernel.
    pub machine: String,
    /// Per configuration.
    pub results: Vec<ConfigResult>,
}

/// Runs the sweep.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
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
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
    if let Some(pressure) = &options.pressure {
        let results =
            pressure::run(&connection, &amqp_url, pressure.burst, pressure.outage).await?;
        let _ = connection.close(200, "bench done".into()).await;
        println!(
            "refund-worker bench --pressure, {} ({})",
            refund_worker::contract::event::now_rfc3339(),
            machine_description()
        );
        for r in &results {
            println!("{}", pressure::describe(r));
        }
        if let Some(path) = &options.json {
            std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(BenchReport {
            date: refund_worker::contract::event::now_rfc3339(),
            machine: machine_description(),
            results: Vec::new(),
        });
    }
    let mut results = Vec::new();
    let mut run_id = 0;
    for &latency_ms in &options.latency_ms {
        for &prefetch in &options.prefetch {
            run_id += 1;
            let result = run_config(
                options,
                &connection,
                &amqp_url,
                run_id,
                latency_ms,
                prefetch,
            )
            .await?;
            print_row(&result);
            results.push(result);
        }
    }
    let _ = connection.close(200, "bench done".into()).await;
    let report = BenchReport {
        date: refund_worker::contract::event::now_rfc3339(),
        machine: machine_description(),
        results,
    };
    print_table(&report);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &options.plot {
        plot::write_svg(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

/// Settings for one configuration: its own exchange and queue names, so runs
/// never see each other's messages, even on a shared broker.
fn bench_settings(
    amqp_url: &str,
    run: &str,
    prefetch: u16,
    store: &Path,
    http_port: u16,
    sandbox_url: &str,
) -> anyhow::Result<Settings> {
    let layer = format!(
        r#"
        [amqp]
        url = "{amqp_url}"
        prefetch = {prefetch}
        commands_exchange = "bench.{run}.commands"
        commands_queue = "bench.{run}.commands"
        events_exchange = "bench.{run}.events"
        dead_letter_exchange = "bench.{run}.dead"
        dead_letter_queue = "bench.{run}.dead"
        delay_queue_prefix = "bench.{run}.retry"
        [store]
        path = "{store}"
        [http]
        addr = "127.0.0.1:{http_port}"
        [providers.hyp_pay]
        kind = "hyp_pay"
        base_url = "{sandbox_url}/p/"
        masof = "0010131918"
        pass_p = "sandbox-pass"
        "#,
        store = store.display()
    );
    let settings = settings_from(&layer)?;
    std::fs::write(store.with_extension("toml"), layer)?;
    Ok(settings)
}

/// The defaults with a benchmark's TOML layer over them, validated.
pub(crate) fn settings_from(layer: &str) -> anyhow::Result<Settings> {
    let settings: Settings = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .add_source(config::File::from_str(layer, config::FileFormat::Toml))
        .build()?
        .try_deserialize()?;
    settings.validate()?;
    Ok(settings)
}

async fn run_config(
    options: &BenchOptions,
    connection: &Connection,
    amqp_url: &str,
    run_id: usize,
    latency_ms: u64,
    prefetch: u16,
) -> anyhow::Result<ConfigResult> {
    let n = options.n;
    let dir = tempfile::tempdir()?;
    let (_sandbox, sandbox_url) = sandbox(latency_ms, n).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Worker and relay take turns: the relay alone varies by about a
    // quarter between runs here, so one pair says little.
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let name = format!("{run_id}.{round}");
        let worker = worker_round(
            options,
            &channel,
            amqp_url,
            &dir,
            &name,
            prefetch,
            &sandbox_url,
            latency_ms,
        )
        .await?;
        let relay = relay_round(
            options,
            &channel,
            amqp_url,
            &dir,
            &name,
            prefetch,
            &sandbox_url,
        )
        .await?;
        let round = Round {
            ratio: if relay.drain.msgs_per_sec > 0.0 {
                worker.drain.msgs_per_sec / relay.drain.msgs_per_sec
            } else {
                0.0
            },
            worker,
            relay,
        };
        eprintln!(
            "  round {}: worker {:.0} msg/s ({:.3} CPU ms, processing p50 {:.2} ms, provider call p50 {:.2} ms), relay {:.0} msg/s ({:.3} CPU ms), ratio {:.2}",
            rounds.len() + 1,
            round.worker.drain.msgs_per_sec,
            round.worker.cpu_ms_per_msg,
            round.worker.processing_p50_ms,
            round.worker.provider_call_p50_ms,
            round.relay.drain.msgs_per_sec,
            round.relay.cpu_ms_per_msg,
            round.ratio
        );
        rounds.push(round);
    }
    let _ = channel.close(200, "config done".into()).await;
    // The round with the median ratio stands for the configuration.
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|a, b| rounds[*a].ratio.total_cmp(&rounds[*b].ratio));
    let median = &rounds[order[order.len() / 2]];
    let ratios = rounds.iter().map(|r| r.ratio);
    let ratio_range = (
        ratios.clone().fold(f64::INFINITY, f64::min),
        ratios.fold(0.0, f64::max),
    );
    Ok(ConfigResult {
        latency_ms,
        prefetch,
        n,
        ratio: median.ratio,
        ratio_range,
        littles_law_msgs_per_sec: (latency_ms > 0)
            .then(|| f64::from(prefetch) / (latency_ms as f64 / 1000.0)),
        worker_peak_rss_mib: rounds
            .iter()
            .map(|r| r.worker.peak_rss_mib)
            .fold(0.0, f64::max),
        worker_cpu_ms_per_msg: median.worker.cpu_ms_per_msg,
        relay_cpu_ms_per_msg: median.relay.cpu_ms_per_msg,
        syncs_per_message: median.worker.syncs_per_message,
        processing_p50_ms: median.worker.processing_p50_ms,
        processing_p99_ms: median.worker.processing_p99_ms,
        worker: median.worker.drain.clone(),
        relay: median.relay.drain.clone(),
        rounds,
    })
}

/// The provider sandbox of a run, in this process: `n` Hyp Pay originals
/// and the given latency. Returns it (it serves while it lives) and its URL.
pub(crate) async fn sandbox(latency_ms: u64, n: usize) -> anyhow::Result<(Sandbox, String)> {
    let sandbox = Sandbox::new(SandboxConfig {
        latency: Duration::from_millis(latency_ms),
        seed: Seed::hyp_pay_range(100_000_000, n, 1_000_000),
        ..SandboxConfig::default()
    });
    let url = format!("http://{}", sandbox.spawn("127.0.0.1:0").await?);
    Ok((sandbox, url))
}

/// One drain by one process, measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    /// The drain.
    pub drain: Drain,
    /// CPU (user + system) of the process per message (ms).
    pub cpu_ms_per_msg: f64,
    /// Peak RSS (MiB).
    pub peak_rss_mib: f64,
    /// Store flushes per message (worker).
    pub syncs_per_message: f64,
    /// Processing time per refund, from arrival in the pipeline to the
    /// ack, 50th percentile (ms; worker).
    pub processing_p50_ms: f64,
    /// 99th percentile (ms; worker).
    pub processing_p99_ms: f64,
    /// The provider call alone, p50 (ms; worker).
    pub provider_call_p50_ms: f64,
}

/// A worker drain and the relay drain after it.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// The worker.
    pub worker: Measured,
    /// The relay.
    pub relay: Measured,
    /// worker ÷ relay.
    pub ratio: f64,
}

#[allow(clippy::too_many_arguments)]
async fn worker_round(
    options: &BenchOptions,
    channel: &Channel,
    amqp_url: &str,
    dir: &tempfile::TempDir,
    name: &str,
    prefetch: u16,
    sandbox_url: &str,
    latency_ms: u64,
) -> anyhow::Result<Measured> {
    let n = options.n;
    let http_port = free_port()?;
    let store = dir.path().join(format!("store-{name}"));
    let settings = bench_settings(
        amqp_url,
        &format!("{name}w"),
        prefetch,
        &store,
        http_port,
        sandbox_url,
    )?;
    topology::declare(channel, &settings).await?;
    let events = bind_events(channel, &settings.amqp.events_exchange).await?;
    preload(
        channel,
        &settings.amqp.commands_exchange,
        n,
        &format!("b{name}"),
    )
    .await?;
    // The worker logs at its default level (one `info` line per refund),
    // as it does in production, into a file as a log collector would read.
    let log = std::fs::File::create(dir.path().join(format!("worker-{name}.log")))?;
    let mut child = std::process::Command::new(&options.worker_exe)
        .arg("run")
        .arg("--config")
        .arg(store.with_extension("toml"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let label = format!("worker  {latency_ms:>3} ms  prefetch {prefetch:>3}");
    let drain = collect(events, n, &label, options.quiet).await;
    let rss = peak_rss_mib(child.id());
    let cpu_ms = cpu_ms(child.id());
    let metrics = scrape(http_port).await;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let flushes = counter(&metrics, "refund_worker_store_flushes_total");
    let processing = histogram(&metrics, "refund_worker_processing_seconds");
    Ok(Measured {
        drain: drain?,
        cpu_ms_per_msg: cpu_ms / n as f64,
        peak_rss_mib: rss,
        syncs_per_message: flushes / n as f64,
        processing_p50_ms: quantile(&processing, 0.5) * 1000.0,
        processing_p99_ms: quantile(&processing, 0.99) * 1000.0,
        provider_call_p50_ms: quantile(
            &histogram(&metrics, "refund_worker_provider_call_seconds"),
            0.5,
        ) * 1000.0,
    })
}

async fn relay_round(
    options: &BenchOptions,
    channel: &Channel,
    amqp_url: &str,
    dir: &tempfile::TempDir,
    name: &str,
    prefetch: u16,
    sandbox_url: &str,
) -> anyhow::Result<Measured> {
    let n = options.n;
    let config = dir.path().join(format!("relay-{name}"));
    let settings = bench_settings(
        amqp_url,
        &format!("{name}r"),
        prefetch,
        &config,
        free_port()?,
        sandbox_url,
    )?;
    topology::declare(channel, &settings).await?;
    let events = bind_events(channel, &settings.amqp.events_exchange).await?;
    preload(
        channel,
        &settings.amqp.commands_exchange,
        n,
        &format!("r{name}"),
    )
    .await?;
    // Its own process, so its CPU is measured like the worker's.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("relay")
        .arg("--config")
        .arg(config.with_extension("toml"))
        .arg("--n")
        .arg(n.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let label = format!("relay   prefetch {prefetch:>3}");
    let drain = collect(events, n, &label, options.quiet).await;
    let rss = peak_rss_mib(child.id());
    let cpu_ms = cpu_ms(child.id());
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    Ok(Measured {
        drain: drain?,
        cpu_ms_per_msg: cpu_ms / n as f64,
        peak_rss_mib: rss,
        ..Measured::default()
    })
}

/// `refund-bench relay`: the relay as a process of its own.
pub async fn relay_process(config: &Path, n: usize) -> anyhow::Result<()> {
    let settings = settings_from(&std::fs::read_to_string(config)?)?;
    let url = refund_worker::values::secret::url_list(&settings.amqp.url)
        .next()
        .unwrap_or_default()
        .to_string();
    relay::run(url, settings.amqp.clone(), n).await?;
    Ok(())
}

fn original_id(i: usize) -> String {
    format!("{}", 100_000_000 + i)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Publishes `n` distinct commands, persistent, all confirmed before return.
async fn preload(channel: &Channel, exchange: &str, n: usize, prefix: &str) -> anyhow::Result<()> {
    let bodies = (0..n).map(|i| {
        serde_json::json!({
            "refund_id": format!("{prefix}-{i}"),
            "provider": "hyp_pay",
            "transaction": { "id": original_id(i) },
            "amount": { "minor": 100, "currency": "ILS" },
            "metadata": { "published_us": now_us() },
        })
        .to_string()
    });
    publish_confirmed(channel, exchange, bodies).await
}

/// Publishes command bodies (persistent, JSON), up to 1 000 confirms in
/// flight, all confirmed before return.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    bodies: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(1000);
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "refund.hyp_pay".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        if pending.len() >= 1000 {
            for c in pending.drain(..) {
                c.await?;
            }
        }
    }
    for c in pending {
        c.await?;
    }
    Ok(())
}

/// The benchmark's own event queue on `exchange`, consumed without acks.
async fn bind_events(channel: &Channel, exchange: &str) -> anyhow::Result<lapin::Consumer> {
    let name = format!("{exchange}.bench");
    Ok(refund_worker::ops::client::consume_events(channel, exchange, &name).await?)
}

/// Consumes `n` events and measures the drain.
async fn collect(
    mut consumer: lapin::Consumer,
    n: usize,
    label: &str,
    quiet: bool,
) -> anyhow::Result<Drain> {
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(n as u64);
        if let Ok(style) = ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {per_sec}") {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        bar
    };
    let mut latencies = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::with_capacity(n);
    let (mut first, mut last) = (None, Instant::now());
    let idle = Duration::from_secs(60);
    while latencies.len() < n {
        let delivery = match tokio::time::timeout(idle, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => anyhow::bail!("{label}: event stream closed"),
            Err(_) => anyhow::bail!(
                "{label}: no event for {idle:?} after {} of {n}",
                latencies.len()
            ),
        };
        let now = Instant::now();
        let v: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        // A refund's event can come twice (cluster mode publishes a
        // reconnect's first-minute events once more); count refunds.
        if let Some(id) = v["refund_id"].as_str() {
            if !seen.insert(id.to_string()) {
                continue;
            }
        }
        first.get_or_insert(now);
        last = now;
        let published = v["metadata"]["published_us"]
            .as_u64()
            .or_else(|| v["published_us"].as_u64());
        if let Some(published) = published {
            latencies.push(now_us().saturating_sub(published) as f64 / 1000.0);
        } else {
            latencies.push(f64::NAN);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    latencies.retain(|l| l.is_finite());
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(Drain {
        msgs_per_sec: if seconds > 0.0 {
            (n.saturating_sub(1)) as f64 / seconds
        } else {
            0.0
        },
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        seconds,
    })
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// User + system CPU time of a process so far (ms), from /proc.
fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): utime and
    // stime are the 12th and 13th after the closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports in USER_HZ, 100 per second on every common platform.
    (ticks(11) + ticks(12)) * 10.0
}

async fn scrape(port: u16) -> String {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return String::new();
    };
    response.text().await.unwrap_or_default()
}

fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A Prometheus histogram's cumulative buckets: (upper bound, count),
/// summed over its label sets.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, count)) = line.rsplit_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split_once("le=\"")
            .and_then(|(_, rest)| rest.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(le) => le,
                Err(_) => continue,
            }
        };
        let count: f64 = count.trim().parse().unwrap_or(0.0);
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some(bucket) => bucket.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside
/// the bucket it falls in (as Prometheus' `histogram_quantile`).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(total) = buckets.last().map(|b| b.1) else {
        return 0.0;
    };
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = count - lower.1;
            let into = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * into;
        }
        lower = (le, count);
    }
    lower.0
}

fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

fn machine_description() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {mem}, Linux {}", kernel.trim())
}

fn check(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn print_row(r: &ConfigResult) {
    eprintln!(
        "latency {:>3} ms  prefetch {:>3}: worker {:>7.0} msg/s, relay {:>7.0} msg/s, ratio {:.2} (rounds {:.2}–{:.2})",
        r.latency_ms,
        r.prefetch,
        r.worker.msgs_per_sec,
        r.relay.msgs_per_sec,
        r.ratio,
        r.ratio_range.0,
        r.ratio_range.1
    );
}

/// The table, with each target checked (issue 13's goals).
pub fn print_table(report: &BenchReport) {
    println!("refund-worker bench, {} ({})", report.date, report.machine);
    println!(
        "{:>6} {:>8} {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  targets",
        "lat_ms",
        "prefetch",
        "worker/s",
        "relay/s",
        "ratio",
        "proc_p50",
        "proc_p99",
        "rss_MiB",
        "syncs",
        "w_cpu_ms",
        "r_cpu_ms",
    );
    for r in &report.results {
        let mut targets = Vec::new();
        if r.latency_ms == 0 && (r.prefetch == 64 || r.prefetch == 256) {
            targets.push(format!("ratio>=0.5 {}", check(r.ratio >= 0.5)));
        }
        if r.latency_ms == 0 && r.prefetch == 64 {
            targets.push(format!(
                "cpu<=0.12ms {}",
                check(r.worker_cpu_ms_per_msg <= 0.12)
            ));
        }
        if let Some(limit) = r.littles_law_msgs_per_sec {
            let goal = 0.95 * limit;
            targets.push(format!(
                "worker>={goal:.0}/s {}",
                check(r.worker.msgs_per_sec >= goal)
            ));
        }
        if r.prefetch == 256 {
            targets.push(format!(
                "rss<=64MiB {}",
                check(r.worker_peak_rss_mib <= 64.0)
            ));
        }
        println!(
            "{:>6} {:>8} {:>9.0} {:>9.0} {:>4.2} {:>4.2}-{:<4.2} {:>8.2} {:>8.2} {:>8.1} {:>8.3} {:>9.3} {:>9.3}  {}",
            r.latency_ms,
            r.prefetch,
            r.worker.msgs_per_sec,
            r.relay.msgs_per_sec,
            r.ratio,
            r.ratio_range.0,
            r.ratio_range.1,
            r.processing_p50_ms,
            r.processing_p99_ms,
            r.worker_peak_rss_mib,
            r.syncs_per_message,
            r.worker_cpu_ms_per_msg,
            r.relay_cpu_ms_per_msg,
            targets.join(", ")
        );
    }
}
