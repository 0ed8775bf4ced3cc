//! `refund-worker bench --pressure`: provider accounts under pressure, the
//! worker in process against the sandbox over HTTP on a private broker.
//!
//! * **Burst**: `burst` refunds for an account limited to `rate_per_sec` 50,
//!   then 100 for another account, published after them; the time until the
//!   second account's 100 are finished, with the per-account share of the
//!   delivery slots (`amqp.account_share` 0.5) and without it (1.0). 50 ms
//!   provider latency, prefetch 64.
//! * **Outage**: the sandbox answers 503 to everything for `outage`; the
//!   provider requests made during it with the circuit breaker on (the
//!   defaults: 5 failures, 30 s cool-down) and off, then whether every
//!   refund still succeeded once, with nothing failed or left over.

use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use refund_sandbox::{Fault, FaultKind, Sandbox, SandboxConfig, Seed};
use refund_worker::config::Settings;
use refund_worker::service::app::App;
use refund_worker::service::shutdown;
use std::time::{Duration, Instant};

/// The figures of one pressure scenario run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PressureResult {
    /// `burst` or `outage`.
    pub scenario: String,
    /// What differed between the two runs of a scenario.
    pub variant: String,
    /// Burst: seconds until the other account's 100 refunds were finished.
    pub other_account_done_secs: Option<f64>,
    /// Outage: provider requests during the outage.
    pub requests_during_outage: Option<u64>,
    /// Outage: refunds succeeded / expected, after it.
    pub succeeded: Option<(usize, usize)>,
    /// Outage: events other than `succeeded` seen.
    pub other_events: Option<usize>,
}

fn settings(
    amqp_url: &str,
    run: &str,
    store: &std::path::Path,
    sandbox_url: &str,
) -> anyhow::Result<Settings> {
    let layer = format!(
        r#"
        [amqp]
        url = "{amqp_url}"
        prefetch = 64
        commands_exchange = "pressure.{run}.commands"
        commands_queue = "pressure.{run}.commands"
        events_exchange = "pressure.{run}.events"
        dead_letter_exchange = "pressure.{run}.dead"
        dead_letter_queue = "pressure.{run}.dead"
        delay_queue_prefix = "pressure.{run}.retry"
        [store]
        path = "{store}"
        [http]
        addr = "127.0.0.1:0"
        [log]
        filter = "error"
        [providers.limited]
        kind = "hyp_pay"
        base_url = "{sandbox_url}/p/"
        masof = "0010131918"
        pass_p = "sandbox-pass"
        [providers.other]
        kind = "hyp_pay"
        base_url = "{sandbox_url}/p/"
        masof = "0010131918"
        pass_p = "sandbox-pass"
        "#,
        store = store.display()
    );
    super::settings_from(&layer)
}

/// A confirm-mode channel with the run's topology declared and the run's
/// events consumed.
async fn prepare(
    connection: &Connection,
    settings: &Settings,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    refund_worker::broker::topology::declare(&channel, settings).await?;
    let events = refund_worker::ops::client::consume_events(
        &channel,
        &settings.amqp.events_exchange,
        &format!("{}.bench", settings.amqp.events_exchange),
    )
    .await?;
    Ok((channel, events))
}

fn refunds(prefix: &str, account: &str, first: u64, n: usize) -> Vec<String> {
    (0..n as u64)
        .map(|i| {
            serde_json::json!({
                "refund_id": format!("{prefix}-{i}"),
                "provider": account,
                "transaction": { "id": (first + i).to_string() },
                "amount": { "minor": 100, "currency": "ILS" },
            })
            .to_string()
        })
        .collect()
}

/// Runs both scenarios, each with and without the feature under test.
pub async fn run(
    connection: &Connection,
    amqp_url: &str,
    burst: usize,
    outage: Duration,
) -> anyhow::Result<Vec<PressureResult>> {
    let mut results = Vec::new();
    for (variant, share) in [("with the share (0.5)", 0.5), ("without it (1.0)", 1.0)] {
        let result = burst_run(connection, amqp_url, burst, share, variant).await?;
        eprintln!("{}", describe(&result));
        results.push(result);
    }
    for (variant, failures) in [
        ("breaker on (5 failures, 30 s cool-down)", 5),
        ("breaker off", 0),
    ] {
        let result = outage_run(connection, amqp_url, outage, failures, variant).await?;
        eprintln!("{}", describe(&result));
        results.push(result);
    }
    Ok(results)
}

/// One line of a result.
pub fn describe(r: &PressureResult) -> String {
    match r.scenario.as_str() {
        "burst" => format!(
            "burst  {:<42} other account's 100 finished after {}",
            r.variant,
            r.other_account_done_secs
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "(not within the limit)".into())
        ),
        _ => format!(
            "outage {:<42} {} provider requests during the outage; afterwards {}/{} succeeded, {} other events",
            r.variant,
            r.requests_during_outage.unwrap_or(0),
            r.succeeded.map(|s| s.0).unwrap_or(0),
            r.succeeded.map(|s| s.1).unwrap_or(0),
            r.other_events.unwrap_or(0)
        ),
    }
}

async fn burst_run(
    connection: &Connection,
    amqp_url: &str,
    burst: usize,
    share: f64,
    variant: &str,
) -> anyhow::Result<PressureResult> {
    let dir = tempfile::tempdir()?;
    let mut seed = Seed::hyp_pay_range(300_000_000, burst, 1_000_000);
    seed.hyp_pay
        .extend(Seed::hyp_pay_range(310_000_000, 100, 1_000_000).hyp_pay);
    let sandbox = Sandbox::new(SandboxConfig {
        latency: Duration::from_millis(50),
        seed,
        ..SandboxConfig::default()
    });
    let sandbox_url = format!("http://{}", sandbox.spawn("127.0.0.1:0").await?);
    let run = format!("burst{}", (share * 10.0) as u32);
    let mut settings = settings(amqp_url, &run, &dir.path().join("store"), &sandbox_url)?;
    settings.amqp.account_share = share;
    if let Some(refund_worker::providers::ProviderAccount::HypPay(a)) =
        settings.providers.get_mut("limited")
    {
        a.policy.rate_per_sec = Some(50.0);
    }
    let (channel, mut events) = prepare(connection, &settings).await?;
    let exchange = settings.amqp.commands_exchange.clone();
    super::publish_confirmed(
        &channel,
        &exchange,
        refunds(&format!("{run}-a"), "limited", 300_000_000, burst),
    )
    .await?;
    super::publish_confirmed(
        &channel,
        &exchange,
        refunds(&format!("{run}-b"), "other", 310_000_000, 100),
    )
    .await?;
    let app = App::build(settings).await?;
    let (trigger, listener) = shutdown::channel();
    let started = Instant::now();
    let task = tokio::spawn(app.run(listener));
    let limit = Duration::from_secs(150);
    let mut other_done = 0;
    let mut done_at = None;
    while other_done < 100 {
        let Some(left) = limit.checked_sub(started.elapsed()) else {
            break;
        };
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(delivery))) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                if v["provider"] == "other" {
                    other_done += 1;
                    if other_done == 100 {
                        done_at = Some(started.elapsed().as_secs_f64());
                    }
                }
            }
            _ => break,
        }
    }
    trigger.fire();
    let _ = task.await;
    let _ = channel.close(200, "burst done".into()).await;
    Ok(PressureResult {
        scenario: "burst".into(),
        variant: variant.into(),
        other_account_done_secs: done_at,
        requests_during_outage: None,
        succeeded: None,
        other_events: None,
    })
}

async fn outage_run(
    connection: &Connection,
    amqp_url: &str,
    outage: Duration,
    failures: u64,
    variant: &str,
) -> anyhow::Result<PressureResult> {
    const N: usize = 200;
    let dir = tempfile::tempdir()?;
    let sandbox = Sandbox::new(SandboxConfig {
        latency: Duration::from_millis(20),
        seed: Seed::hyp_pay_range(320_000_000, N, 1_000_000),
        ..SandboxConfig::default()
    });
    let sandbox_url = format!("http://{}", sandbox.spawn("127.0.0.1:0").await?);
    let run = format!("outage{failures}");
    let mut settings = settings(amqp_url, &run, &dir.path().join("store"), &sandbox_url)?;
    if let Some(refund_worker::providers::ProviderAccount::HypPay(a)) =
        settings.providers.get_mut("limited")
    {
        a.policy.breaker.failures = failures;
    }
    let (channel, mut events) = prepare(connection, &settings).await?;
    sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: None,
        times: u32::MAX,
        stall_ms: 0,
    });
    let app = App::build(settings.clone()).await?;
    let (trigger, listener) = shutdown::channel();
    let task = tokio::spawn(app.run(listener));
    super::publish_confirmed(
        &channel,
        &settings.amqp.commands_exchange,
        refunds(&run, "limited", 320_000_000, N),
    )
    .await?;
    tokio::time::sleep(outage).await;
    let during = sandbox.requests();
    sandbox.clear_faults();
    // Afterwards: every refund must succeed once (delay queues bring them
    // back; the longest default round is 5 minutes, so allow for it).
    let mut succeeded = 0;
    let mut other = 0;
    let limit = Instant::now() + Duration::from_secs(420);
    while succeeded < N {
        let Some(left) = limit.checked_duration_since(Instant::now()) else {
            break;
        };
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(delivery))) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                if v["status"] == "succeeded" {
                    succeeded += 1;
                } else {
                    other += 1;
                }
            }
            _ => break,
        }
    }
    trigger.fire();
    let _ = task.await;
    let _ = channel.close(200, "outage done".into()).await;
    Ok(PressureResult {
        scenario: "outage".into(),
        variant: variant.into(),
        other_account_done_secs: None,
        requests_during_outage: Some(during),
        succeeded: Some((succeeded, N)),
        other_events: Some(other),
    })
}
