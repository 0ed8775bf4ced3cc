//! What the console's page shows, gathered apart from how it is shown: the
//! data comes from the store, the gates and the dead-letter queue here;
//! `templates/console/*.html` render it (askama, which escapes every value
//! by default, so no text from a command, a provider or an operator can
//! become markup).

use crate::ops::dlq::Dlq;
use crate::store::RefundState;
use crate::worker::Worker;
use askama::Template;

/// Dead letters listed on the page (the rest are counted).
const DEAD_LETTERS_SHOWN: usize = 50;

/// The sign-in page.
#[derive(Template)]
#[template(path = "console/login.html")]
pub(super) struct LoginPage {
    pub(super) title: &'static str,
    /// The token given was wrong.
    pub(super) refused: bool,
}

/// The page of what needs a person.
#[derive(Template)]
#[template(path = "console/page.html")]
pub(super) struct ConsolePage {
    title: &'static str,
    msg: Option<String>,
    err: Option<String>,
    accounts: Vec<Account>,
    doubt: Vec<Doubt>,
    dead: Vec<Dead>,
    dead_total: u32,
    dead_error: Option<String>,
    overdue: Vec<Overdue>,
    report: String,
}

struct Account {
    name: String,
    breaker: &'static str,
    waiting: usize,
}

struct Doubt {
    id: String,
    provider: String,
    operation: &'static str,
    attempts: u32,
    error: String,
}

struct Dead {
    id: String,
    names_refund: bool,
    kind: String,
    error: String,
    attempts: i64,
}

struct Overdue {
    id: String,
    provider: String,
    since: String,
}

impl ConsolePage {
    /// Gathers the page: the accounts' gates, refunds in doubt, the first
    /// dead letters (browsing holds them unacked until it closes), pending
    /// refunds past their alert age and today's report.
    pub(super) async fn gather(worker: &Worker, msg: Option<String>, err: Option<String>) -> Self {
        let accounts = worker
            .providers()
            .gates()
            .map(|(name, gate)| Account {
                name: name.clone(),
                breaker: gate.breaker_state().as_str(),
                waiting: gate.waiting(),
            })
            .collect();
        let today = time::OffsetDateTime::now_utc().date();
        let report = worker
            .store()
            .report(today, today)
            .await
            .unwrap_or_default();
        let mut page = ConsolePage {
            title: "refund-worker: operator console",
            msg,
            err,
            accounts,
            doubt: in_doubt(worker).await,
            dead: Vec::new(),
            dead_total: 0,
            dead_error: None,
            overdue: overdue(worker).await,
            report: crate::contract::report::to_table(&report),
        };
        page.dead_letters(worker).await;
        page
    }

    async fn dead_letters(&mut self, worker: &Worker) {
        match Dlq::open_first(&worker.settings().amqp, DEAD_LETTERS_SHOWN).await {
            Ok(dlq) => {
                self.dead_total = dlq.total();
                self.dead = dlq
                    .messages()
                    .iter()
                    .map(|m| Dead {
                        id: m.refund_id.clone().unwrap_or_else(|| "-".into()),
                        names_refund: m.refund_id.is_some(),
                        kind: m.kind.clone(),
                        error: m.error.clone(),
                        attempts: m.attempts,
                    })
                    .collect();
                dlq.close().await;
            }
            Err(e) => self.dead_error = Some(e.to_string()),
        }
    }
}

async fn in_doubt(worker: &Worker) -> Vec<Doubt> {
    let records = worker
        .store()
        .list(Some("in_doubt".into()), 1000)
        .await
        .unwrap_or_default();
    records
        .into_iter()
        .filter_map(|record| match &record.state {
            RefundState::InDoubt { event } => Some(Doubt {
                id: record.refund_id.clone(),
                provider: record.command.provider.clone(),
                operation: record.command.operation.as_str(),
                attempts: record.attempts,
                error: event
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

async fn overdue(worker: &Worker) -> Vec<Overdue> {
    let store = worker.store();
    let settings = worker.settings().clone();
    let late = store
        .census(move |p| settings.pending_alert_after(p))
        .await
        .map(|c| c.overdue)
        .unwrap_or_default();
    let mut overdue = Vec::new();
    for id in late {
        if let Ok(Some(record)) = store.get(&id).await {
            if let RefundState::Pending { since, .. } = &record.state {
                overdue.push(Overdue {
                    id,
                    provider: record.command.provider.clone(),
                    since: since.clone(),
                });
            }
        }
    }
    overdue
}
