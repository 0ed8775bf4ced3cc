//! How a refund record is laid out on disk.
//!
//! Two forms, told apart by the first byte:
//!
//! - **JSON** (`{`): what every version wrote before the compact form, and
//!   what cluster mode still writes (the state log carries records between
//!   replicas, which may run different versions during a rolling upgrade).
//!   `store.record_format = "json"` keeps a single-node worker on it too.
//! - **Compact** ([`COMPACT_V1`], [`COMPACT_V2`]): the default, about a
//!   third of the JSON one. A record is written twice per refund and sled
//!   copies it whole (into its log, into leaf nodes when it consolidates
//!   or splits them, onto disk) and keeps it in its cache, so its size is
//!   sled work and memory (`docs/performance.md`, "Compact records").
//!
//! Both are always readable, so a store moves from one to the other record
//! by record, as refunds are written. A version older than the compact form
//! cannot read it (`CHANGELOG.md`).
//!
//! The compact layout, in order (every field present; `opt` is a 0/1 byte
//! and the value when 1):
//!
//! ```text
//! 0x01 │ state tag │ provider │ state's fields (since / reason / event)
//!      │ refund_id │ payload_hash (hex) │ command │ attempts │ callback_token (hex)
//!      │ in_doubt_episodes │ created_at │ updated_at │ history (count, then at, note)
//! 0x02 │ the same │ extras (JSON text)
//! ```
//!
//! Version 2 adds the fields that came after version 1 (what each attempt
//! carried, attempts with an unknown outcome) as one JSON text at the end.
//! A record that has none of them is still written as version 1, byte for
//! byte, so that versions that know only version 1 keep reading it.
//!
//! The state and the account come first so that the census reads only
//! them. Integers are LEB128. A string is either a reference to an equal
//! string earlier in the same record (its index + 1) or 0, its length and
//! its UTF-8 bytes: the refund id, the account, the timestamps and the
//! metadata repeat inside a record, between the command, the event and the
//! history. Hex strings (the payload hash, the callback token) are stored
//! as their bytes. JSON that the command carries as is (`transaction`,
//! `installments`, `metadata`) is stored as its JSON text.

use crate::contract::command::{Operation, PayoutTarget, RefundCommand};
use crate::contract::event::{EventError, OutcomeEvent, Status};
use crate::contract::money::Amount;
use crate::store::record::{AttemptTrace, HistoryEntry, RefundRecord, RefundState};
use std::borrow::Cow;

/// The first byte of a compact record (a JSON record starts with `{`).
const COMPACT_V1: u8 = 1;

/// The first byte of a compact record with extras at its end.
const COMPACT_V2: u8 = 2;

/// The fields a version 1 record has no place for.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Extras {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<AttemptTrace>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    uncertain: Vec<AttemptTrace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payout: Option<PayoutTarget>,
}

impl Extras {
    fn of(record: &RefundRecord) -> Option<Self> {
        let extras = Extras {
            attempt: record.attempt.clone(),
            uncertain: record.uncertain.clone(),
            payout: record.command.payout.clone(),
        };
        let any =
            extras.attempt.is_some() || !extras.uncertain.is_empty() || extras.payout.is_some();
        any.then_some(extras)
    }
}

/// Which form new records are written in (`store.record_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// The compact binary form.
    #[default]
    Compact,
    /// JSON, readable by every version.
    Json,
}

/// Why stored bytes are not a record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A JSON record, or JSON inside a compact one, that does not parse.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A compact record that does not follow the layout.
    #[error("compact record: {0}")]
    Compact(&'static str),
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Encodes `record` in `format`.
pub(crate) fn encode(record: &RefundRecord, format: RecordFormat) -> Vec<u8> {
    match format {
        // Serialising plain data with serde_json cannot fail.
        RecordFormat::Json => serde_json::to_vec(record).unwrap_or_default(),
        RecordFormat::Compact => encode_compact(record),
    }
}

/// Decodes a record in either form.
pub(crate) fn decode(bytes: &[u8]) -> Result<RefundRecord> {
    match bytes.first() {
        Some(&COMPACT_V1 | &COMPACT_V2) => decode_compact(bytes),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// What the census reads of a record: its state's name, since when it is
/// pending, its account.
#[derive(Debug, PartialEq)]
pub(crate) struct Glance<'a> {
    pub(crate) state: Cow<'a, str>,
    pub(crate) since: Option<Cow<'a, str>>,
    pub(crate) provider: Cow<'a, str>,
}

/// The parts of a JSON record that the census reads; decoding only these
/// skips the event, the history and every other string.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    state: PeekState<'a>,
    #[serde(borrow)]
    command: PeekCommand<'a>,
}

/// A state's tag and, for `pending`, since when.
#[derive(serde::Deserialize)]
struct PeekState<'a> {
    #[serde(borrow)]
    state: Cow<'a, str>,
    #[serde(borrow, default)]
    since: Option<Cow<'a, str>>,
}

/// A command's provider account.
#[derive(serde::Deserialize)]
struct PeekCommand<'a> {
    #[serde(borrow)]
    provider: Cow<'a, str>,
}

/// Reads only what the census needs, in either form.
pub(crate) fn glance(bytes: &[u8]) -> Result<Glance<'_>> {
    if !matches!(bytes.first(), Some(&COMPACT_V1 | &COMPACT_V2)) {
        let peek: Peek<'_> = serde_json::from_slice(bytes)?;
        return Ok(Glance {
            state: peek.state.state,
            since: peek.state.since,
            provider: peek.command.provider,
        });
    }
    let mut r = Reader::new(bytes)?;
    let tag = r.byte()?;
    let provider = r.str()?;
    let since = (tag == PENDING).then(|| r.str()).transpose()?;
    Ok(Glance {
        state: Cow::Borrowed(state_name(tag)?),
        since: since.map(Cow::Borrowed),
        provider: Cow::Borrowed(provider),
    })
}

const ATTEMPTING: u8 = 0;
const NOT_SENT: u8 = 1;
const PENDING: u8 = 2;
const FINISHED: u8 = 3;
const IN_DOUBT: u8 = 4;

fn state_tag(state: &RefundState) -> u8 {
    match state {
        RefundState::Attempting { .. } => ATTEMPTING,
        RefundState::NotSent { .. } => NOT_SENT,
        RefundState::Pending { .. } => PENDING,
        RefundState::Finished { .. } => FINISHED,
        RefundState::InDoubt { .. } => IN_DOUBT,
    }
}

fn state_name(tag: u8) -> Result<&'static str> {
    Ok(match tag {
        ATTEMPTING => "attempting",
        NOT_SENT => "not_sent",
        PENDING => "pending",
        FINISHED => "finished",
        IN_DOUBT => "in_doubt",
        _ => return Err(DecodeError::Compact("unknown state")),
    })
}

fn encode_compact(record: &RefundRecord) -> Vec<u8> {
    let mut w = Writer::default();
    let extras = Extras::of(record);
    w.out.push(if extras.is_some() {
        COMPACT_V2
    } else {
        COMPACT_V1
    });
    let command = &record.command;
    w.byte(state_tag(&record.state));
    w.str(&command.provider);
    match &record.state {
        RefundState::Attempting { since } => w.str(since),
        RefundState::NotSent { reason } => w.str(reason),
        RefundState::Pending { event, since } => {
            w.str(since);
            w.event(event);
        }
        RefundState::Finished { event } | RefundState::InDoubt { event } => w.event(event),
    }
    w.str(&record.refund_id);
    w.hex(&record.payload_hash);
    w.str(&command.refund_id);
    w.byte(operation_tag(command.operation));
    w.json(&command.transaction);
    w.opt(command.amount.as_ref(), Writer::amount);
    w.opt(command.original_amount, |w, n| w.uint(n));
    w.opt(command.installments.as_ref(), Writer::json);
    w.opt(command.order_id.as_deref(), Writer::str);
    w.opt(command.reason.as_deref(), Writer::str);
    w.opt(command.metadata.as_ref(), Writer::json);
    w.uint(u64::from(record.attempts));
    w.hex(&record.callback_token);
    w.uint(u64::from(record.in_doubt_episodes));
    w.str(&record.created_at);
    w.str(&record.updated_at);
    w.uint(record.history.len() as u64);
    for entry in &record.history {
        w.str(&entry.at);
        w.str(&entry.note);
    }
    if let Some(extras) = extras {
        w.json(&extras);
    }
    w.out
}

fn decode_compact(bytes: &[u8]) -> Result<RefundRecord> {
    let mut r = Reader::new(bytes)?;
    let tag = r.byte()?;
    let provider = r.string()?;
    let state = match tag {
        ATTEMPTING => RefundState::Attempting { since: r.string()? },
        NOT_SENT => RefundState::NotSent {
            reason: r.string()?,
        },
        PENDING => {
            let since = r.string()?;
            RefundState::Pending {
                event: r.event()?,
                since,
            }
        }
        FINISHED => RefundState::Finished { event: r.event()? },
        IN_DOUBT => RefundState::InDoubt { event: r.event()? },
        _ => return Err(DecodeError::Compact("unknown state")),
    };
    let refund_id = r.string()?;
    let payload_hash = r.hex()?;
    let mut command = RefundCommand {
        payout: None,
        refund_id: r.string()?,
        provider,
        operation: r.operation()?,
        transaction: r.json()?,
        amount: r.opt(Reader::amount)?,
        original_amount: r.opt(Reader::uint)?,
        installments: r.opt(Reader::json)?,
        order_id: r.opt(Reader::string)?,
        reason: r.opt(Reader::string)?,
        metadata: r.opt(Reader::json)?,
    };
    let attempts = r.u32()?;
    let callback_token = r.hex()?;
    let in_doubt_episodes = r.u32()?;
    let created_at = r.string()?;
    let updated_at = r.string()?;
    let count = r.uint()?;
    // Each entry takes at least two bytes: a corrupt count cannot make
    // this allocate more than the record's size.
    let mut history = Vec::with_capacity((count as usize).min(r.remaining() / 2));
    for _ in 0..count {
        history.push(HistoryEntry {
            at: r.string()?,
            note: r.string()?,
        });
    }
    let extras: Extras = match bytes[0] {
        COMPACT_V2 => r.json()?,
        _ => Extras::default(),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Compact("bytes after the record"));
    }
    command.payout = extras.payout;
    let state = with_payout_echo(state, &command);
    Ok(RefundRecord {
        refund_id,
        payload_hash,
        command,
        state,
        attempts,
        callback_token,
        in_doubt_episodes,
        created_at,
        updated_at,
        history,
        attempt: extras.attempt,
        uncertain: extras.uncertain,
        revision: 0,
        daily_limit: None,
    })
}

/// The compact event has no place for a payout's card digits: they come
/// from the command, as they did when the event was made.
fn with_payout_echo(mut state: RefundState, command: &RefundCommand) -> RefundState {
    let echo = command.payout.as_ref().map(PayoutTarget::echo);
    match &mut state {
        RefundState::Pending { event, .. }
        | RefundState::Finished { event }
        | RefundState::InDoubt { event } => event.payout = echo,
        RefundState::Attempting { .. } | RefundState::NotSent { .. } => {}
    }
    state
}

fn operation_tag(operation: Operation) -> u8 {
    match operation {
        Operation::Refund => 0,
        Operation::Cancel => 1,
        Operation::Payout => 2,
    }
}

fn status_tag(status: Status) -> u8 {
    match status {
        Status::Succeeded => 0,
        Status::Failed => 1,
        Status::Rejected => 2,
        Status::Pending => 3,
        Status::InDoubt => 4,
    }
}

/// Builds a compact record.
#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    /// Where each string written in full starts and ends in `out`.
    strings: Vec<(usize, usize)>,
}

impl Writer {
    fn byte(&mut self, b: u8) {
        self.out.push(b);
    }

    fn uint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.out.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.out.push(n as u8);
    }

    fn str(&mut self, s: &str) {
        let earlier = self
            .strings
            .iter()
            .position(|&(start, end)| &self.out[start..end] == s.as_bytes());
        if let Some(index) = earlier {
            self.uint(index as u64 + 1);
            return;
        }
        self.uint(0);
        self.uint(s.len() as u64);
        let start = self.out.len();
        self.out.extend_from_slice(s.as_bytes());
        self.strings.push((start, self.out.len()));
    }

    /// Lower-case hex as its bytes (1, count, bytes); anything else as a
    /// string (0, string), so that every value comes back as it was.
    fn hex(&mut self, s: &str) {
        let is_hex = s.len().is_multiple_of(2)
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_hex {
            self.byte(0);
            self.str(s);
            return;
        }
        self.byte(1);
        self.uint(s.len() as u64 / 2);
        for pair in s.as_bytes().chunks_exact(2) {
            self.out.push((nibble(pair[0]) << 4) | nibble(pair[1]));
        }
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        let text = serde_json::to_string(value).unwrap_or_default();
        self.str(&text);
    }

    fn opt<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.byte(0),
            Some(value) => {
                self.byte(1);
                write(self, value);
            }
        }
    }

    fn amount(&mut self, amount: &Amount) {
        self.uint(amount.minor);
        self.str(&amount.currency);
    }

    fn event(&mut self, event: &OutcomeEvent) {
        self.str(&event.event_id);
        self.str(&event.refund_id);
        self.byte(status_tag(event.status));
        self.opt(event.provider.as_deref(), Writer::str);
        self.opt(event.operation, |w, op| w.byte(operation_tag(op)));
        self.opt(event.performed, |w, op| w.byte(operation_tag(op)));
        self.opt(event.amount.as_ref(), Writer::amount);
        self.opt(event.provider_transaction_id.as_deref(), Writer::str);
        self.opt(event.provider_code.as_deref(), Writer::str);
        self.opt(event.provider_message.as_deref(), Writer::str);
        self.opt(event.error.as_ref(), |w, error| {
            w.str(&error.kind);
            w.str(&error.message);
        });
        self.uint(u64::from(event.attempts));
        self.opt(event.order_id.as_deref(), Writer::str);
        self.opt(event.metadata.as_ref(), Writer::json);
        self.str(&event.occurred_at);
    }
}

fn nibble(hex: u8) -> u8 {
    match hex {
        b'0'..=b'9' => hex - b'0',
        _ => hex - b'a' + 10,
    }
}

/// Reads a compact record; every read checks the bounds.
struct Reader<'b> {
    bytes: &'b [u8],
    pos: usize,
    strings: Vec<&'b str>,
}

impl<'b> Reader<'b> {
    /// After the format byte.
    fn new(bytes: &'b [u8]) -> Result<Self> {
        if !matches!(bytes.first(), Some(&COMPACT_V1 | &COMPACT_V2)) {
            return Err(DecodeError::Compact("not a compact record"));
        }
        Ok(Reader {
            bytes,
            pos: 1,
            strings: Vec::new(),
        })
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8]> {
        if n > self.remaining() {
            return Err(DecodeError::Compact("truncated"));
        }
        let taken = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self) -> Result<u64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Compact("integer too large"));
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::Compact("integer too large"))
    }

    fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.uint()?).map_err(|_| DecodeError::Compact("integer too large"))
    }

    fn len(&mut self) -> Result<usize> {
        usize::try_from(self.uint()?).map_err(|_| DecodeError::Compact("length too large"))
    }

    fn str(&mut self) -> Result<&'b str> {
        let tag = self.len()?;
        if tag > 0 {
            return self
                .strings
                .get(tag - 1)
                .copied()
                .ok_or(DecodeError::Compact("reference to an unknown string"));
        }
        let len = self.len()?;
        let s = std::str::from_utf8(self.take(len)?)
            .map_err(|_| DecodeError::Compact("string is not UTF-8"))?;
        self.strings.push(s);
        Ok(s)
    }

    fn string(&mut self) -> Result<String> {
        self.str().map(str::to_string)
    }

    fn hex(&mut self) -> Result<String> {
        match self.byte()? {
            0 => self.string(),
            1 => {
                let len = self.len()?;
                Ok(crate::contract::command::hex(self.take(len)?))
            }
            _ => Err(DecodeError::Compact("unknown hex tag")),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        Ok(serde_json::from_str(self.str()?)?)
    }

    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        match self.byte()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            _ => Err(DecodeError::Compact("unknown option tag")),
        }
    }

    fn operation(&mut self) -> Result<Operation> {
        match self.byte()? {
            0 => Ok(Operation::Refund),
            1 => Ok(Operation::Cancel),
            2 => Ok(Operation::Payout),
            _ => Err(DecodeError::Compact("unknown operation")),
        }
    }

    fn status(&mut self) -> Result<Status> {
        Ok(match self.byte()? {
            0 => Status::Succeeded,
            1 => Status::Failed,
            2 => Status::Rejected,
            3 => Status::Pending,
            4 => Status::InDoubt,
            _ => return Err(DecodeError::Compact("unknown status")),
        })
    }

    fn amount(&mut self) -> Result<Amount> {
        Ok(Amount {
            minor: self.uint()?,
            currency: self.string()?,
        })
    }

    fn event(&mut self) -> Result<OutcomeEvent> {
        Ok(OutcomeEvent {
            event_id: self.string()?,
            refund_id: self.string()?,
            status: self.status()?,
            provider: self.opt(Reader::string)?,
            operation: self.opt(Reader::operation)?,
            performed: self.opt(Reader::operation)?,
            amount: self.opt(Reader::amount)?,
            provider_transaction_id: self.opt(Reader::string)?,
            provider_code: self.opt(Reader::string)?,
            provider_message: self.opt(Reader::string)?,
            error: self.opt(|r| {
                Ok(EventError {
                    kind: r.string()?,
                    message: r.string()?,
                })
            })?,
            attempts: self.u32()?,
            order_id: self.opt(Reader::string)?,
            metadata: self.opt(Reader::json)?,
            payout: None,
            occurred_at: self.string()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::event::now_rfc3339;

    /// A command with every optional field, non-ASCII text and nested JSON
    /// (built directly: the codec stores whatever the record holds).
    fn full_command() -> RefundCommand {
        let json = serde_json::json!({
            "id": "12290620", "card": {"last4": "4580"}, "n": [1, 2.5, -3]
        });
        RefundCommand {
            refund_id: "rf-u-1".into(),
            provider: "creditguard_main".into(),
            operation: Operation::Cancel,
            transaction: json.as_object().cloned().unwrap_or_default(),
            amount: Some(Amount {
                minor: u64::MAX,
                currency: "ILS".into(),
            }),
            original_amount: Some(5000),
            payout: None,
            installments: Some(serde_json::json!({"count": 3, "first": {"minor": 350}})),
            order_id: Some("ord-991".into()),
            reason: Some("customer \"request\"\nline two, שלום".into()),
            metadata: Some(serde_json::json!({
                "ticket": "CS-4411", "tags": ["a", "ב"], "ok": true, "none": null, "f": 0.1
            })),
        }
    }

    /// A command with no optional field.
    fn bare_command() -> RefundCommand {
        RefundCommand::parse(br#"{"refund_id":"r2","provider":"p","transaction":{"id":"1"}}"#)
            .expect("command")
    }

    fn full_event(record: &RefundRecord, status: Status) -> OutcomeEvent {
        let mut event = OutcomeEvent::new(&record.refund_id, status, &record.command.echo(), 2)
            .with_error("declined", "provider declined: 33 לא");
        event.performed = Some(Operation::Refund);
        event.provider_transaction_id = Some("98765".into());
        event.provider_code = Some("033".into());
        event.provider_message = Some("Id=1&CCode=33".into());
        event
    }

    /// Every state, with full and with bare commands and events.
    fn records() -> Vec<RefundRecord> {
        let mut all = Vec::new();
        for command in [full_command(), bare_command()] {
            let base = RefundRecord::attempting(&command);
            let bare_event =
                OutcomeEvent::new(&base.refund_id, Status::Succeeded, &Default::default(), 1);
            let states = vec![
                base.state.clone(),
                RefundState::NotSent {
                    reason: "connection refused".into(),
                },
                RefundState::Pending {
                    event: full_event(&base, Status::Pending),
                    since: now_rfc3339(),
                },
                RefundState::Finished {
                    event: full_event(&base, Status::Failed),
                },
                RefundState::Finished { event: bare_event },
                RefundState::InDoubt {
                    event: full_event(&base, Status::InDoubt),
                },
            ];
            for (i, state) in states.into_iter().enumerate() {
                let mut record = base.clone();
                record.transition(state, "moved on");
                record.attempts = 300;
                record.in_doubt_episodes = 2;
                if i % 2 == 1 {
                    // Version 2: what the attempts carried.
                    let trace = AttemptTrace {
                        number: 299,
                        kind: "creditguard".into(),
                        request_id: Some("rf-1".into()),
                        terminal: Some("0882819014".into()),
                        at: now_rfc3339(),
                    };
                    record.uncertain = vec![trace.clone()];
                    record.attempt = Some(trace);
                }
                all.push(record);
            }
        }
        all
    }

    #[test]
    fn every_state_comes_back_as_it_was_in_both_forms() {
        for record in records() {
            for format in [RecordFormat::Compact, RecordFormat::Json] {
                let bytes = encode(&record, format);
                assert_eq!(decode(&bytes).expect("decode"), record, "{format:?}");
            }
        }
    }

    #[test]
    fn a_payout_comes_back_whole_and_its_events_keep_the_last_four_digits() {
        let command = RefundCommand::parse(
            br#"{"refund_id":"po-1","provider":"hyp_pay","operation":"payout",
                "amount":{"minor":2500,"currency":"ILS"},
                "payout":{"card_token":"4724478937284730772","expiry_month":"05",
                          "expiry_year":"31","holder_name":"Jenny"}}"#,
        )
        .expect("payout");
        let mut record = RefundRecord::attempting(&command);
        let event = OutcomeEvent::new("po-1", Status::Succeeded, &command.echo(), 1);
        record.transition(RefundState::Finished { event }, "paid");
        for format in [RecordFormat::Compact, RecordFormat::Json] {
            let back = decode(&encode(&record, format)).expect("decodes");
            assert_eq!(back, record, "{format:?}");
            let echo = back.state.event().and_then(|e| e.payout.clone());
            assert_eq!(echo.map(|p| p.card_last4).as_deref(), Some("0772"));
            let token = back.command.payout.as_ref().map(|p| p.card_token.expose());
            assert_eq!(
                token,
                Some("4724478937284730772"),
                "the record keeps it whole"
            );
        }
    }

    #[test]
    fn a_record_written_as_json_by_an_older_version_is_read() {
        let json = br#"{"refund_id":"r1","payload_hash":"ab12","command":{"refund_id":"r1",
            "provider":"hyp_pay","operation":"refund","transaction":{"id":"1"}},
            "state":{"state":"not_sent","reason":"timeout"},"attempts":1,
            "created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:01Z",
            "history":[{"at":"2026-01-01T00:00:00Z","note":"attempt 1 started"}]}"#;
        let record = decode(json).expect("decode");
        assert_eq!(record.refund_id, "r1");
        assert_eq!(record.callback_token, "");
        assert_eq!(record.state.name(), "not_sent");
        // And it survives the move to the compact form.
        let compact = encode(&record, RecordFormat::Compact);
        assert_eq!(decode(&compact).expect("decode"), record);
    }

    #[test]
    fn hashes_and_tokens_that_are_not_lower_case_hex_come_back_as_they_were() {
        let mut record = RefundRecord::attempting(&bare_command());
        for odd in ["", "abc", "ABCD", "zz", "00ff", "0g"] {
            record.payload_hash = odd.into();
            record.callback_token = odd.into();
            let bytes = encode(&record, RecordFormat::Compact);
            assert_eq!(decode(&bytes).expect("decode"), record, "{odd:?}");
        }
    }

    #[test]
    fn a_typical_finished_record_takes_less_than_half_the_bytes_of_json() {
        let command = RefundCommand::parse(
            br#"{"refund_id":"b64w-1234","provider":"hyp_pay","transaction":{"id":"100001234"},
                "amount":{"minor":100,"currency":"ILS"},"metadata":{"published_us":1764446000000000}}"#,
        )
        .expect("command");
        let mut record = RefundRecord::attempting(&command);
        let mut event = OutcomeEvent::new(&record.refund_id, Status::Succeeded, &command.echo(), 1);
        event.performed = Some(Operation::Refund);
        event.provider_transaction_id = Some("5557777".into());
        event.provider_code = Some("0".into());
        record.transition(RefundState::Finished { event }, "outcome succeeded");
        let json = encode(&record, RecordFormat::Json).len();
        let compact = encode(&record, RecordFormat::Compact).len();
        assert!(compact * 2 < json, "compact {compact} bytes, JSON {json}");
    }

    #[test]
    fn damaged_compact_records_are_errors_never_panics() {
        for record in records() {
            let bytes = encode(&record, RecordFormat::Compact);
            for end in 0..bytes.len() {
                assert!(decode(&bytes[..end]).is_err(), "prefix of {end} bytes");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
            for at in 1..bytes.len() {
                for value in [0x00, 0x7f, 0x80, 0xff] {
                    let mut damaged = bytes.clone();
                    damaged[at] = value;
                    let _ = decode(&damaged);
                    let _ = glance(&damaged);
                }
            }
        }
        assert!(decode(&[
            COMPACT_V1, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02
        ])
        .is_err());
    }

    #[test]
    fn the_census_glance_agrees_with_the_whole_record_in_both_forms() {
        for record in records() {
            for format in [RecordFormat::Compact, RecordFormat::Json] {
                let bytes = encode(&record, format);
                let seen = glance(&bytes).expect("glance");
                assert_eq!(seen.state, record.state.name());
                assert_eq!(seen.provider, record.command.provider);
                let since = match &record.state {
                    RefundState::Pending { since, .. } | RefundState::Attempting { since } => {
                        Some(since.as_str())
                    }
                    _ => None,
                };
                // JSON has `since` for attempting too; the census reads it
                // only for pending refunds.
                if record.state.name() == "pending" || format == RecordFormat::Json {
                    assert_eq!(seen.since.as_deref(), since, "{format:?}");
                } else {
                    assert_eq!(seen.since, None);
                }
            }
        }
    }

    /// A finished record with fixed values: its compact bytes are
    /// `fuzz/seeds/store_record/finished.bin` (also a fuzzing seed).
    fn pinned() -> RefundRecord {
        let command = RefundCommand::parse(
            br#"{"refund_id":"rf-example-hyp-refund-1","provider":"hyp_pay","operation":"refund",
                "transaction":{"id":"12290620"},"amount":{"minor":1050,"currency":"ILS"},
                "order_id":"ord-991","reason":"customer request","metadata":{"ticket":"CS-4411"}}"#,
        )
        .expect("command");
        let at = "2026-11-29T20:00:00.123456789Z".to_string();
        let mut event =
            OutcomeEvent::new(&command.refund_id, Status::Succeeded, &command.echo(), 1);
        event.performed = Some(Operation::Refund);
        event.provider_transaction_id = Some("12290621".into());
        event.provider_code = Some("0".into());
        event.occurred_at = "2026-11-29T20:00:00.200000001Z".into();
        RefundRecord {
            daily_limit: None,
            refund_id: command.refund_id.clone(),
            payload_hash: command.payload_hash(),
            state: RefundState::Finished { event },
            attempts: 1,
            callback_token: "00112233445566778899aabbccddeeff".into(),
            in_doubt_episodes: 0,
            created_at: at.clone(),
            updated_at: "2026-11-29T20:00:00.200000001Z".into(),
            history: vec![
                HistoryEntry {
                    at,
                    note: "attempt 1 started".into(),
                },
                HistoryEntry {
                    at: "2026-11-29T20:00:00.200000001Z".into(),
                    note: "outcome succeeded".into(),
                },
            ],
            command,
            attempt: None,
            uncertain: Vec::new(),
            revision: 0,
        }
    }

    #[test]
    fn the_compact_layout_of_version_1_does_not_change() {
        // Records already on disk must stay readable: a change to the
        // layout needs a new format byte, not an edit of this one.
        let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/store_record");
        let stored = std::fs::read(format!("{seeds}/finished.bin")).expect("pinned record");
        assert_eq!(decode(&stored).expect("decode"), pinned());
        assert_eq!(encode(&pinned(), RecordFormat::Compact), stored);
        // The other seed: a pending record as JSON, as older versions wrote it.
        let json = std::fs::read(format!("{seeds}/json-record.json")).expect("json seed");
        let record = decode(&json).expect("decode");
        assert_eq!(record.state.name(), "pending");
        assert_eq!(record.history.len(), 2);
    }
}
