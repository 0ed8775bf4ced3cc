//! Provider accounts under pressure, on a real broker and the sandbox over
//! HTTP: concurrency caps and rates as the provider sees them, one account's
//! burst not starving another, the circuit breaker during an outage, and
//! the W3C trace context from a command to its event and provider request.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig, Seed};
use serde_json::json;
use std::time::Duration;
use support::{header, policy_mut, TestApp, HYP_REFUND, WAIT};

/// Hyp Pay refunds of the seeded originals `first..first + n`.
fn refunds(prefix: &str, first: u64, n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            json!({
                "refund_id": format!("{prefix}-{i}"),
                "provider": "hyp_pay",
                "transaction": { "id": (first + i).to_string() },
                "amount": { "minor": 100, "currency": "ILS" },
            })
            .to_string()
        })
        .collect()
}

fn seeded(first: u64, n: usize, latency_ms: u64) -> SandboxConfig {
    // The documented examples' originals, and n more Hyp Pay charges.
    let mut seed = Seed::default_seed();
    seed.hyp_pay
        .extend(Seed::hyp_pay_range(first, n, 10_000).hyp_pay);
    SandboxConfig {
        seed,
        latency: Duration::from_millis(latency_ms),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_never_sees_more_than_its_limits() {
    let config = seeded(60_000_000, 12, 200);
    let mut app = TestApp::start_with(config, |s| {
        let policy = policy_mut(s, "hyp_pay");
        policy.max_in_flight = Some(2);
        policy.rate_per_sec = Some(10.0);
        policy.burst = Some(1);
    })
    .await;
    for body in refunds("rf-limit", 60_000_000, 12) {
        app.publish(&body).await;
    }
    for _ in 0..12 {
        assert_eq!(app.next_event().await.0, "refund.succeeded");
    }
    assert_eq!(app.sandbox.journal().len(), 12);
    assert!(
        app.sandbox.max_concurrent() <= 2,
        "at most 2 in flight, saw {}",
        app.sandbox.max_concurrent()
    );
    // 10 per second with a burst of 1: the 12 requests span at least 11
    // intervals of 100 ms (slack for scheduling), and none comes right on
    // the heels of the one before.
    let arrivals = app.sandbox.arrivals();
    let span = arrivals[arrivals.len() - 1].duration_since(arrivals[0]);
    assert!(
        span >= Duration::from_millis(1000),
        "12 requests within {span:?}"
    );
    for pair in arrivals.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(50), "requests {gap:?} apart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_account_does_not_take_the_other_accounts_slots() {
    // hyp_pay: 2 per second. creditguard: unlimited. Prefetch 8, share 0.5.
    let config = seeded(61_000_000, 40, 0);
    let mut app = TestApp::start_with(config, |s| {
        s.amqp.prefetch = 8;
        s.retry.delayed_ms = vec![500, 1000];
        let policy = policy_mut(s, "hyp_pay");
        policy.rate_per_sec = Some(2.0);
        policy.burst = Some(1);
    })
    .await;
    for body in refunds("rf-burst", 61_000_000, 40) {
        app.publish(&body).await;
    }
    let cg = json!({
        "refund_id": "rf-other-account",
        "provider": "creditguard",
        "transaction": { "cg_uid": "118390001" },
        "amount": { "minor": 100, "currency": "ILS" },
    })
    .to_string();
    app.publish(&cg).await;
    // The other account's refund is done long before the 40 throttled ones
    // (20 s at 2 per second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other account's refund waited behind the throttled ones"
        );
        let (key, event) = app.next_event().await;
        if event["refund_id"] == "rf-other-account" {
            assert_eq!(key, "refund.succeeded");
            break;
        }
    }
    let metrics = reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("refund_worker_gate_parked_total{provider=\"hyp_pay\",why=\"share\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_the_breaker_stops_calls_and_nothing_is_lost_or_failed() {
    let config = seeded(62_000_000, 10, 0);
    let mut app = TestApp::start_with(config, |s| {
        s.retry.max_attempts = 1;
        // Each failed probe uses up one round of the refund it carried.
        s.retry.delayed_ms = vec![300; 20];
        s.retry.deadline_ms = 60_000;
        let policy = policy_mut(s, "hyp_pay");
        policy.breaker.failures = 3;
        policy.breaker.cooldown = Duration::from_millis(1500);
    })
    .await;
    // The provider answers 503 to everything for now.
    app.sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: None,
        times: 1_000,
        stall_ms: 0,
    });
    for body in refunds("rf-outage", 62_000_000, 10) {
        app.publish(&body).await;
    }
    // Three failures open the breaker (refunds already admitted still go:
    // they were sent before any failure was known).
    let readyz = format!("http://{}/readyz", app.http_addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready: serde_json::Value = reqwest::get(&readyz)
            .await
            .expect("readyz")
            .json()
            .await
            .expect("json");
        if ready["providers"]["hyp_pay"]["breaker"] == "open" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Open: no refund calls the provider; one probe per 1.5 s cool-down.
    let opened_at = app.sandbox.requests();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let probes = app.sandbox.requests() - opened_at;
    assert!(
        probes <= 3,
        "{probes} requests in 3.5 s with the breaker open (one probe per 1.5 s cool-down)"
    );
    let ready: serde_json::Value = reqwest::get(format!("http://{}/readyz", app.http_addr))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(
        ready["consuming"], true,
        "an open breaker keeps the worker ready"
    );
    assert_ne!(
        ready["providers"]["hyp_pay"]["breaker"], "closed",
        "{ready}"
    );
    assert_eq!(ready["providers"]["creditguard"]["breaker"], "closed");
    // The outage ends: the next probe closes the breaker, all are paid once.
    app.sandbox.clear_faults();
    for _ in 0..10 {
        let (key, event) = app.next_event().await;
        assert_eq!(key, "refund.succeeded", "{event}");
    }
    assert_eq!(app.sandbox.journal().len(), 10);
    assert_eq!(app.queue_depth("refunds.dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_s_trace_reaches_its_event_its_dead_letter_and_the_provider() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        policy_mut(s, "hyp_pay").propagate_trace = true;
    })
    .await;
    app.capture_events("trace.events").await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    app.publish_traced(HYP_REFUND, parent).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    let deadline = tokio::time::Instant::now() + WAIT;
    let event_headers = loop {
        let got = app
            .channel
            .basic_get(
                "trace.events".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get");
        if let Some(message) = got {
            break message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
        }
        assert!(tokio::time::Instant::now() < deadline, "no event captured");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let traceparent = header(&event_headers, "traceparent").expect("traceparent on the event");
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the refund's own span"
    );
    // The provider request carried the same span (the account enables it).
    assert_eq!(app.sandbox.traceparents(), vec![traceparent.clone()]);

    // A dead letter carries it too; a malformed traceparent is ignored.
    app.publish_traced("{not json", parent).await;
    let (_, headers) = app.next_dead_letter().await;
    let dead = header(&headers, "traceparent").expect("traceparent on the dead letter");
    assert!(
        dead.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{dead}"
    );
    let other = support::with_refund_id(HYP_REFUND, "rf-bad-trace");
    let other = other.replace("12290620", "12290621");
    app.publish_traced(&other, "00-nonsense").await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
}
