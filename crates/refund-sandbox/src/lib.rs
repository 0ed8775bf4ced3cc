//! The provider sandbox: a local stand-in for the providers that behaves the
//! way their documentation describes, keeps state (original charges, what
//! was refunded, transmitted or not), records every execution in a journal
//! and can inject faults. Used by the tests, the local run and demos.
//!
//! Provider endpoints: Hyp Pay at `/p/`, CreditGuard at `/xpo/Relay`, Paynet
//! at `/v1/transaction/reversed_request`. Control endpoints under `/_sandbox/`:
//! `GET journal`, `GET originals`, `POST originals` (add seed entries),
//! `POST faults` (queue faults), `POST latency` (`{"ms": 50}`).

mod clock;
pub mod creditguard;
pub mod hyp_pay;
mod hyp_pay_payout;
pub mod paynet;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;

/// The seed shipped with the repository (used when no `--seed` is given).
pub const DEFAULT_SEED: &str = include_str!("../../../examples/sandbox-seed.json");

/// Sandbox credentials and behaviour.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Hyp Pay terminal number the sandbox accepts.
    pub hyp_masof: String,
    /// Hyp Pay password the sandbox accepts.
    pub hyp_pass_p: String,
    /// Hyp Pay credit password (`zPass`) the sandbox accepts for payouts.
    pub hyp_z_pass: String,
    /// CreditGuard API user the sandbox accepts.
    pub cg_user: String,
    /// CreditGuard password the sandbox accepts.
    pub cg_password: String,
    /// CreditGuard terminal number.
    pub cg_terminal: String,
    /// Paynet secret key the sandbox accepts.
    pub paynet_secret: String,
    /// Delay before Paynet's final answer is posted to `succeedUrl`.
    pub paynet_callback_delay: Duration,
    /// Added before every provider answer.
    pub latency: Duration,
    /// Original charges.
    pub seed: Seed,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            hyp_masof: "0010131918".into(),
            hyp_pass_p: "sandbox-pass".into(),
            hyp_z_pass: "sandbox-zpass".into(),
            cg_user: "sandbox-user".into(),
            cg_password: "sandbox-pass".into(),
            cg_terminal: "0882819014".into(),
            paynet_secret: "sandbox-secret".into(),
            paynet_callback_delay: Duration::from_millis(200),
            latency: Duration::ZERO,
            seed: Seed::default_seed(),
        }
    }
}

/// Original charges by provider.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seed {
    /// Hyp Pay transactions.
    #[serde(default)]
    pub hyp_pay: Vec<SeedTransaction>,
    /// CreditGuard transactions.
    #[serde(default)]
    pub creditguard: Vec<creditguard::CgOriginal>,
    /// Paynet transactions.
    #[serde(default)]
    pub paynet: Vec<paynet::PaynetOriginal>,
    /// Card tokens Hyp Pay knows, for payouts.
    #[serde(default)]
    pub hyp_pay_cards: Vec<SeedCard>,
}

/// A card token the sandbox can pay out to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedCard {
    /// The 19-digit token.
    pub token: String,
    /// `MM`.
    pub expiry_month: String,
    /// `YY`.
    pub expiry_year: String,
}

impl Seed {
    /// The repository's seed.
    pub fn default_seed() -> Self {
        serde_json::from_str(DEFAULT_SEED).unwrap_or_default()
    }

    /// `count` transmitted Hyp Pay originals with ids `first_id`,
    /// `first_id + 1`, ... (for tests and the benchmark).
    pub fn hyp_pay_range(first_id: u64, count: usize, amount_minor: u64) -> Self {
        Seed {
            hyp_pay: (0..count as u64)
                .map(|i| SeedTransaction {
                    id: (first_id + i).to_string(),
                    amount_minor,
                    currency: "ILS".into(),
                    transmitted: true,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Reads a seed file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One original charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedTransaction {
    /// Provider transaction id.
    pub id: String,
    /// Charged amount, minor units.
    pub amount_minor: u64,
    /// Currency.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Already transmitted to the card company (then it can be refunded,
    /// not cancelled).
    #[serde(default = "yes")]
    pub transmitted: bool,
}

fn default_currency() -> String {
    "ILS".into()
}

pub(crate) fn yes() -> bool {
    true
}

/// An original charge and what happened to it since.
#[derive(Debug, Clone, Serialize)]
pub struct Original {
    /// As seeded.
    #[serde(flatten)]
    pub seed: SeedTransaction,
    /// Sum refunded so far.
    pub refunded_minor: u64,
    /// Cancelled before transmission.
    pub cancelled: bool,
}

/// One thing the sandbox executed (money moved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// `hyp_pay`.
    pub provider: String,
    /// Provider action (`zikoyAPI`, `CancelTrans`).
    pub action: String,
    /// Original transaction.
    pub original_id: String,
    /// Amount moved (minor units).
    pub amount_minor: u64,
    /// Id of the new transaction.
    pub new_id: String,
}

/// A fault applied to the next matching provider request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// HTTP 503 without executing.
    Unavailable,
    /// An HTML error page without executing.
    HtmlBefore,
    /// Execute, then answer an HTML error page.
    HtmlAfter,
    /// Execute, then keep the connection silent for `stall_ms`.
    StallAfter,
    /// Answer `CCode=<code>` without executing (Hyp Pay: any documented
    /// code a test wants to see), `{"answer_code": 997}`.
    AnswerCode(u32),
}

/// A queued fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What to do.
    pub fault: FaultKind,
    /// Only for requests about this original transaction (any when absent).
    #[serde(default)]
    pub original_id: Option<String>,
    /// How many matching requests it applies to.
    #[serde(default = "one")]
    pub times: u32,
    /// Stall length for `stall_after`.
    #[serde(default = "default_stall")]
    pub stall_ms: u64,
}

fn one() -> u32 {
    1
}

fn default_stall() -> u64 {
    120_000
}

/// Notes the `traceparent` a provider request carries (the worker sends it
/// only for accounts with `propagate_trace`).
async fn record_traceparent(
    State(sandbox): State<Sandbox>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(value) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        sandbox.lock().traceparents.push(value.to_string());
    }
    next.run(request).await
}

/// Mutable sandbox state. Locked briefly, never across an await.
#[derive(Debug)]
pub struct SandboxState {
    config: SandboxConfig,
    originals: HashMap<String, Original>,
    cg_originals: HashMap<String, creditguard::CgState>,
    /// mayBeDuplicate: requestId → (request fingerprint, answer).
    cg_requests: HashMap<String, (String, String)>,
    paynet_originals: HashMap<String, paynet::PaynetState>,
    journal: Vec<Execution>,
    faults: VecDeque<Fault>,
    requests: u64,
    next_id: u64,
    /// Provider requests being answered now, and the most at once.
    in_flight: usize,
    max_in_flight: usize,
    /// When each provider request arrived (for rate checks).
    arrivals: Vec<std::time::Instant>,
    /// `traceparent` headers received, in order.
    traceparents: Vec<String>,
}

impl SandboxState {
    fn new(config: SandboxConfig) -> Self {
        let mut state = SandboxState {
            originals: HashMap::new(),
            cg_originals: HashMap::new(),
            cg_requests: HashMap::new(),
            paynet_originals: HashMap::new(),
            journal: Vec::new(),
            faults: VecDeque::new(),
            requests: 0,
            next_id: 405_577_499,
            in_flight: 0,
            max_in_flight: 0,
            arrivals: Vec::new(),
            traceparents: Vec::new(),
            config,
        };
        let seed = state.config.seed.clone();
        state.add_seed(&seed);
        state
    }

    fn add_seed(&mut self, seed: &Seed) {
        self.cg_originals
            .extend(creditguard::index(&seed.creditguard));
        self.paynet_originals.extend(paynet::index(&seed.paynet));
        for t in &seed.hyp_pay {
            self.originals.insert(
                t.id.clone(),
                Original {
                    seed: t.clone(),
                    refunded_minor: 0,
                    cancelled: false,
                },
            );
        }
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// Takes the fault for a request about `original_id`, if one is queued.
    fn take_fault(&mut self, original_id: &str) -> Option<Fault> {
        let index = self
            .faults
            .iter()
            .position(|f| f.original_id.as_deref().is_none_or(|id| id == original_id))?;
        let fault = self.faults.get_mut(index)?;
        let taken = fault.clone();
        fault.times = fault.times.saturating_sub(1);
        if fault.times == 0 {
            self.faults.remove(index);
        }
        Some(taken)
    }
}

/// Shared handle to the sandbox state.
#[derive(Debug, Clone)]
pub struct Sandbox {
    state: Arc<Mutex<SandboxState>>,
}

impl Sandbox {
    /// A sandbox with this configuration.
    pub fn new(config: SandboxConfig) -> Self {
        Sandbox {
            state: Arc::new(Mutex::new(SandboxState::new(config))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SandboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every execution so far.
    pub fn journal(&self) -> Vec<Execution> {
        self.lock().journal.clone()
    }

    /// Provider requests received so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// The most provider requests it answered at once.
    pub fn max_concurrent(&self) -> usize {
        self.lock().max_in_flight
    }

    /// When each provider request arrived.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.lock().arrivals.clone()
    }

    /// The `traceparent` headers provider requests carried.
    pub fn traceparents(&self) -> Vec<String> {
        self.lock().traceparents.clone()
    }

    /// Removes every queued fault (an outage ends).
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Queues a fault.
    pub fn add_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Adds originals.
    pub fn add_seed(&self, seed: &Seed) {
        self.lock().add_seed(seed);
    }

    /// Sets the latency.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().config.latency = latency;
    }

    /// What every provider endpoint does first: wait the configured
    /// latency, then count the request and decide its answer under the lock
    /// (never held across an await).
    async fn answer<T>(&self, decide: impl FnOnce(&mut SandboxState) -> T) -> T {
        let latency = {
            let mut state = self.lock();
            state.in_flight += 1;
            state.max_in_flight = state.max_in_flight.max(state.in_flight);
            state.arrivals.push(std::time::Instant::now());
            state.config.latency
        };
        if !latency.is_zero() {
            wait_precisely(latency).await;
        }
        let mut state = self.lock();
        state.requests += 1;
        state.in_flight -= 1;
        decide(&mut state)
    }

    /// The routes: provider endpoints and control endpoints.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/p/", get(hyp_pay::handle).post(hyp_pay::handle))
            .route("/p", get(hyp_pay::handle).post(hyp_pay::handle))
            .route("/xpo/Relay", post(creditguard::handle))
            .route("/v1/transaction/reversed_request", post(paynet::handle))
            .route("/_sandbox/journal", get(journal))
            .route("/_sandbox/originals", get(originals).post(add_originals))
            .route("/_sandbox/faults", post(add_faults))
            .route("/_sandbox/latency", post(set_latency))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                record_traceparent,
            ))
            .with_state(self.clone())
    }

    /// Binds `addr` and serves in a background task. Returns the bound address.
    pub async fn spawn(&self, addr: &str) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(bound)
    }
}

async fn journal(State(sandbox): State<Sandbox>) -> Json<serde_json::Value> {
    let state = sandbox.lock();
    Json(serde_json::json!({
        "requests": state.requests,
        "executions": state.journal,
    }))
}

async fn originals(State(sandbox): State<Sandbox>) -> Json<serde_json::Value> {
    let state = sandbox.lock();
    let mut hyp: Vec<&Original> = state.originals.values().collect();
    hyp.sort_by(|a, b| a.seed.id.cmp(&b.seed.id));
    let mut cg: Vec<&creditguard::CgState> = state.cg_originals.values().collect();
    cg.sort_by(|a, b| a.seed.tran_id.cmp(&b.seed.tran_id));
    let mut paynet: Vec<&paynet::PaynetState> = state.paynet_originals.values().collect();
    paynet.sort_by(|a, b| a.seed.xact_id.cmp(&b.seed.xact_id));
    Json(serde_json::json!({ "hyp_pay": hyp, "creditguard": cg, "paynet": paynet }))
}

async fn add_originals(State(sandbox): State<Sandbox>, Json(seed): Json<Seed>) -> &'static str {
    sandbox.add_seed(&seed);
    "ok\n"
}

async fn add_faults(
    State(sandbox): State<Sandbox>,
    Json(faults): Json<Vec<Fault>>,
) -> &'static str {
    for fault in faults {
        sandbox.add_fault(fault);
    }
    "ok\n"
}

#[derive(Deserialize)]
struct Latency {
    ms: u64,
}

async fn set_latency(State(sandbox): State<Sandbox>, Json(l): Json<Latency>) -> &'static str {
    sandbox.set_latency(Duration::from_millis(l.ms));
    "ok\n"
}

/// Waits `latency`, to within a few hundredths of a millisecond (see
/// `clock.rs`: tokio's timer would add a millisecond or two).
async fn wait_precisely(latency: std::time::Duration) {
    clock::sleep_until(std::time::Instant::now() + latency).await;
}
