//! What stands between a refund and its provider account: a concurrency cap
//! (`max_in_flight`), a token bucket (`rate_per_sec` with `burst`), the
//! account's own slowdowns (`Retry-After`, 429), and a circuit breaker that
//! stops calling an account that keeps failing.
//!
//! A refund passes the gate before its `Attempting` record is written, so a
//! refund that waits here holds no provider connection and has nothing in
//! flight. How many refunds of one account may wait at once is bounded by
//! the pipeline (a share of the prefetch), so one busy account cannot take
//! every delivery slot from the others.

use serde::Deserialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Per-account limits and breaker settings (`providers.<name>.…`).
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct AccountPolicy {
    /// Requests in flight to this account at most.
    #[serde(default, deserialize_with = "crate::values::lenient::optional_u64")]
    pub max_in_flight: Option<u64>,
    /// Requests per second at most (token bucket).
    #[serde(default, deserialize_with = "crate::values::lenient::optional_f64")]
    pub rate_per_sec: Option<f64>,
    /// Requests that may go at once after a quiet spell (bucket size);
    /// default: one second's worth of `rate_per_sec`.
    #[serde(default, deserialize_with = "crate::values::lenient::optional_u64")]
    pub burst: Option<u64>,
    /// Send W3C `traceparent` with provider requests (off: providers may
    /// refuse headers they do not know).
    #[serde(default, deserialize_with = "crate::values::lenient::bool")]
    pub propagate_trace: bool,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: BreakerSettings,
}

/// `providers.<name>.breaker.…`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct BreakerSettings {
    /// Consecutive not-sent or unknown answers that open the breaker
    /// (0 turns it off).
    #[serde(
        default = "default_failures",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub failures: u64,
    /// Failures count together only within this window.
    #[serde(
        default = "default_window",
        deserialize_with = "crate::values::duration::required"
    )]
    pub window: Duration,
    /// How long an open breaker waits before one probe request.
    #[serde(
        default = "default_cooldown",
        deserialize_with = "crate::values::duration::required"
    )]
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: default_failures(),
            window: default_window(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_failures() -> u64 {
    5
}

fn default_window() -> Duration {
    Duration::from_secs(60)
}

fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

impl AccountPolicy {
    /// Checks values that cannot work; `Err((field, problem))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_in_flight == Some(0) {
            return Err(("max_in_flight", "must be at least 1".into()));
        }
        if let Some(rate) = self.rate_per_sec {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(("rate_per_sec", format!("must be above 0, not {rate}")));
            }
        }
        if self.burst == Some(0) {
            return Err(("burst", "must be at least 1".into()));
        }
        if self.burst.is_some() && self.rate_per_sec.is_none() {
            return Err(("burst", "needs rate_per_sec".into()));
        }
        if self.breaker.failures > 0 {
            if self.breaker.window.is_zero() {
                return Err(("breaker.window", "must be longer than zero".into()));
            }
            if self.breaker.cooldown.is_zero() {
                return Err(("breaker.cooldown", "must be longer than zero".into()));
            }
        }
        Ok(())
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests wait in the delay queues without calling the provider.
    Open,
    /// One probe request is deciding.
    HalfOpen,
}

impl BreakerState {
    /// For logs, `/readyz` and the gauge.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Breaker {
    Closed { failures: u64, since: Instant },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens per second now (lowered while the provider asks us to slow down).
    rate: f64,
    tokens: f64,
    refilled: Instant,
    /// No token before this (a `Retry-After`).
    paused_until: Option<Instant>,
    /// The configured rate comes back at this time.
    lowered_until: Option<Instant>,
}

/// Why a refund may not go to the provider now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open (or probing): wait in a delay queue.
    BreakerOpen,
}

/// Leave to call the provider: hold it for the whole attempt.
#[derive(Debug)]
pub struct Pass {
    _permit: Option<OwnedSemaphorePermit>,
    /// This request is the breaker's probe.
    pub probe: bool,
}

/// One account's gate; shared by all deliveries of this process.
#[derive(Debug)]
pub struct Gate {
    name: String,
    policy: AccountPolicy,
    in_flight: Option<Arc<Semaphore>>,
    bucket: Option<Mutex<Bucket>>,
    breaker: Mutex<Breaker>,
    waiting: AtomicUsize,
}

/// Counts a refund waiting at the gate for as long as it lives.
#[derive(Debug)]
pub struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// The gate of account `name`.
    pub fn new(name: &str, policy: &AccountPolicy) -> Self {
        let now = Instant::now();
        Gate {
            name: name.to_string(),
            in_flight: policy
                .max_in_flight
                .map(|n| Arc::new(Semaphore::new(usize::try_from(n).unwrap_or(usize::MAX)))),
            bucket: policy.rate_per_sec.map(|rate| {
                Mutex::new(Bucket {
                    rate,
                    tokens: burst_of(policy, rate),
                    refilled: now,
                    paused_until: None,
                    lowered_until: None,
                })
            }),
            breaker: Mutex::new(Breaker::Closed {
                failures: 0,
                since: now,
            }),
            waiting: AtomicUsize::new(0),
            policy: policy.clone(),
        }
    }

    /// Whether requests carry `traceparent`.
    pub fn propagate_trace(&self) -> bool {
        self.policy.propagate_trace
    }

    /// Refunds of this account waiting at the gate now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Counts a waiting refund unless `limit` refunds already wait.
    pub fn try_wait(&self, limit: usize) -> Option<Waiting<'_>> {
        let mut current = self.waiting.load(Ordering::SeqCst);
        loop {
            if current >= limit {
                return None;
            }
            match self.waiting.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Waiting(self)),
                Err(now) => current = now,
            }
        }
    }

    /// Whether the account is limited at all (then refunds may wait here).
    pub fn limited(&self) -> bool {
        self.in_flight.is_some() || self.bucket.is_some()
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        match &*lock(&self.breaker) {
            Breaker::Closed { .. } => BreakerState::Closed,
            Breaker::Open { .. } => BreakerState::Open,
            Breaker::HalfOpen => BreakerState::HalfOpen,
        }
    }

    /// Leave to call the provider: refused while the breaker is open;
    /// otherwise waits for a slot under `max_in_flight` and a token of the
    /// bucket.
    pub async fn pass(&self) -> Result<Pass, Refusal> {
        let probe = self.admit()?;
        let permit = match &self.in_flight {
            Some(semaphore) => semaphore.clone().acquire_owned().await.ok(),
            None => None,
        };
        self.pace().await;
        Ok(Pass {
            _permit: permit,
            probe,
        })
    }

    /// The breaker's admission: `Ok(true)` for the probe after a cool-down.
    fn admit(&self) -> Result<bool, Refusal> {
        if self.policy.breaker.failures == 0 {
            return Ok(false);
        }
        let mut breaker = lock(&self.breaker);
        match &*breaker {
            Breaker::Closed { .. } => Ok(false),
            Breaker::Open { until } if Instant::now() >= *until => {
                *breaker = Breaker::HalfOpen;
                self.transition(BreakerState::HalfOpen);
                Ok(true)
            }
            Breaker::Open { .. } | Breaker::HalfOpen => Err(Refusal::BreakerOpen),
        }
    }

    /// Records how a request ended: `reached` is false for "not sent" and
    /// "unknown" answers (the account may be down), true for anything the
    /// provider decided (confirmed, declined, accepted, misconfigured).
    pub fn record(&self, reached: bool, probe: bool) {
        let settings = &self.policy.breaker;
        if settings.failures == 0 {
            return;
        }
        let now = Instant::now();
        let mut breaker = lock(&self.breaker);
        let next = match (&*breaker, reached) {
            (Breaker::HalfOpen, true) if probe => Some(Breaker::Closed {
                failures: 0,
                since: now,
            }),
            (Breaker::HalfOpen, false) if probe => Some(Breaker::Open {
                until: now + settings.cooldown,
            }),
            (Breaker::Closed { .. }, true) => {
                *breaker = Breaker::Closed {
                    failures: 0,
                    since: now,
                };
                None
            }
            (Breaker::Closed { failures, since }, false) => {
                let (failures, since) = if now.duration_since(*since) > settings.window {
                    (1, now)
                } else {
                    (failures + 1, *since)
                };
                if failures >= settings.failures {
                    Some(Breaker::Open {
                        until: now + settings.cooldown,
                    })
                } else {
                    *breaker = Breaker::Closed { failures, since };
                    None
                }
            }
            // Answers of requests sent before the breaker opened.
            _ => None,
        };
        if let Some(next) = next {
            let state = match next {
                Breaker::Closed { .. } => BreakerState::Closed,
                Breaker::Open { .. } => BreakerState::Open,
                Breaker::HalfOpen => BreakerState::HalfOpen,
            };
            *breaker = next;
            drop(breaker);
            self.transition(state);
        }
    }

    fn transition(&self, state: BreakerState) {
        match state {
            BreakerState::Open => {
                tracing::error!(provider = %self.name, "circuit breaker open: refunds of this account wait in the delay queues without calling it")
            }
            BreakerState::HalfOpen => {
                tracing::warn!(provider = %self.name, "circuit breaker half-open: one probe request decides")
            }
            BreakerState::Closed => {
                tracing::info!(provider = %self.name, "circuit breaker closed: the account answers again")
            }
        }
        crate::observability::metrics::breaker_state(&self.name, state.as_str());
    }

    /// The provider asked us to slow down (`Retry-After`, HTTP 429): no
    /// request before `after` has passed, and half the rate for four times
    /// as long.
    pub fn slow_down(&self, after: Duration) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let now = Instant::now();
        let mut b = lock(bucket);
        b.paused_until = Some(now + after);
        let base = self.policy.rate_per_sec.unwrap_or(b.rate);
        b.rate = (base / 2.0).max(0.1);
        b.lowered_until = Some(now + after * 4);
        b.tokens = b.tokens.min(1.0);
        crate::observability::metrics::provider_slowed(&self.name);
        tracing::warn!(provider = %self.name, pause_ms = after.as_millis() as u64, "provider asked to slow down: rate halved for a while");
    }

    /// Waits for a token of the bucket (none when the account has no rate):
    /// in-process retries of a refund that already passed pace themselves
    /// with this.
    pub async fn pace(&self) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        loop {
            let wait = {
                let mut b = lock(bucket);
                let now = Instant::now();
                if b.lowered_until.is_some_and(|t| now >= t) {
                    b.rate = self.policy.rate_per_sec.unwrap_or(b.rate);
                    b.lowered_until = None;
                }
                let cap = burst_of(&self.policy, b.rate);
                let elapsed = now.duration_since(b.refilled).as_secs_f64();
                b.tokens = (b.tokens + elapsed * b.rate).min(cap);
                b.refilled = now;
                match b.paused_until {
                    Some(until) if now < until => until - now,
                    _ if b.tokens >= 1.0 => {
                        b.tokens -= 1.0;
                        return;
                    }
                    _ => Duration::from_secs_f64((1.0 - b.tokens) / b.rate),
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

fn burst_of(policy: &AccountPolicy, rate: f64) -> f64 {
    policy
        .burst
        .map(|b| b as f64)
        .unwrap_or_else(|| rate.ceil().max(1.0))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(failures: u64) -> AccountPolicy {
        AccountPolicy {
            breaker: BreakerSettings {
                failures,
                window: Duration::from_secs(60),
                cooldown: Duration::from_secs(30),
            },
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_probes_once_and_closes() {
        let gate = Gate::new("p", &policy(3));
        for _ in 0..2 {
            let pass = gate.pass().await.expect("closed");
            gate.record(false, pass.probe);
        }
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
        let pass = gate.pass().await.expect("closed");
        gate.record(false, pass.probe);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        assert_eq!(gate.pass().await.err(), Some(Refusal::BreakerOpen));
        tokio::time::advance(Duration::from_secs(31)).await;
        let probe = gate.pass().await.expect("the probe");
        assert!(probe.probe);
        // Only one probe at a time.
        assert_eq!(gate.pass().await.err(), Some(Refusal::BreakerOpen));
        gate.record(false, true);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(31)).await;
        let probe = gate.pass().await.expect("the probe");
        gate.record(true, probe.probe);
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
        // A success resets the count.
        for _ in 0..2 {
            gate.record(false, false);
        }
        gate.record(true, false);
        gate.record(false, false);
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_spaces_requests_and_slows_down_when_asked() {
        let policy = AccountPolicy {
            rate_per_sec: Some(10.0),
            burst: Some(2),
            ..policy(0)
        };
        let gate = Gate::new("p", &policy);
        let start = Instant::now();
        for _ in 0..12 {
            gate.pass().await.expect("pass");
        }
        // 2 at once, then 10 at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1100),
            "{took:?}"
        );
        gate.slow_down(Duration::from_secs(2));
        let start = Instant::now();
        gate.pass().await.expect("pass");
        assert!(start.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test]
    async fn at_most_max_in_flight_passes_are_held() {
        let policy = AccountPolicy {
            max_in_flight: Some(2),
            ..policy(0)
        };
        let gate = Arc::new(Gate::new("p", &policy));
        let a = gate.pass().await.expect("a");
        let _b = gate.pass().await.expect("b");
        let third = tokio::time::timeout(Duration::from_millis(50), gate.pass()).await;
        assert!(third.is_err(), "a third waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("after a slot frees")
            .expect("pass");
        assert!(gate.try_wait(1).is_some());
        let held = gate.try_wait(1);
        assert!(held.is_some());
        assert!(gate.try_wait(1).is_none(), "one waiter at most");
        drop(held);
        assert!(gate.try_wait(1).is_some());
    }

    #[test]
    fn nonsense_limits_are_named() {
        let mut p = policy(5);
        p.rate_per_sec = Some(0.0);
        assert_eq!(p.check().map_err(|e| e.0), Err("rate_per_sec"));
        let mut p = policy(5);
        p.max_in_flight = Some(0);
        assert_eq!(p.check().map_err(|e| e.0), Err("max_in_flight"));
        let mut p = policy(5);
        p.breaker.window = Duration::ZERO;
        assert_eq!(p.check().map_err(|e| e.0), Err("breaker.window"));
    }
}
