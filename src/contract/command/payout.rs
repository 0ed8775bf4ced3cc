//! The `payout` part of a command: where a payout credits the money (a card
//! token, its expiry, the holder). A payout has no earlier charge, so the
//! card is the whole reference.
//!
//! The card token is card data. It is kept whole only where the money needs
//! it: the command as stored (a payout not yet sent must be sent with it)
//! and the provider request. Everywhere else (logs, `Debug`, events, dead
//! letters, the operator API and console, error messages) it is masked to
//! its last four digits, and no error message ever quotes a value of this
//! object.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// How long a card token is (Hyp Pay: "19-digit token").
pub(super) const TOKEN_DIGITS: usize = 19;

/// A card token. `Debug` and `Display` print its masked form; the whole
/// value is reachable only through [`CardToken::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct CardToken(String);

impl CardToken {
    /// The whole token, for the provider request and the store.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its last four digits.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len().saturating_sub(4)..]
    }

    /// The masked form: stars, then the last four digits (`***…0772`).
    pub fn masked(&self) -> String {
        mask_string(&self.0)
    }

    /// Whether this is a masked token (read back from a dead letter, which
    /// carries the masked form only): it cannot be sent to a provider.
    pub fn is_masked(&self) -> bool {
        self.0.starts_with('*')
    }

    /// A token in either form: 19 digits, or 15 stars and 4 digits.
    fn parse(text: &str) -> Option<Self> {
        if !text.is_ascii() {
            return None;
        }
        let digits = text.bytes().filter(u8::is_ascii_digit).count();
        let stars = text.len() - digits;
        let shaped = text.len() == TOKEN_DIGITS
            && (stars == 0
                || (stars == TOKEN_DIGITS - 4 && text[..stars].bytes().all(|b| b == b'*')));
        shaped.then(|| CardToken(text.to_string()))
    }
}

impl fmt::Debug for CardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardToken({})", self.masked())
    }
}

impl Serialize for CardToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Where a payout goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayoutTarget {
    /// The card token receiving the funds (`CC` with `Token=True`).
    pub card_token: CardToken,
    /// `MM` (`Tmonth`).
    pub expiry_month: String,
    /// `YY` (`Tyear`).
    pub expiry_year: String,
    /// The holder's 9-digit Israeli id (`UserId`); absent sends `000000000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_id: Option<String>,
    /// The holder's first name (`ClientName`).
    pub holder_name: String,
    /// Free text for the merchant's reports (`Info`); absent sends the
    /// refund id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
}

/// What events say of a payout's card: its last four digits only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutEcho {
    /// The card token's last four digits.
    pub card_last4: String,
}

impl PayoutTarget {
    /// The same target with the token masked: what leaves the worker.
    pub fn masked(&self) -> Self {
        PayoutTarget {
            card_token: CardToken(self.card_token.masked()),
            ..self.clone()
        }
    }

    /// What events carry.
    pub fn echo(&self) -> PayoutEcho {
        PayoutEcho {
            card_last4: self.card_token.last4().to_string(),
        }
    }

    /// Reads the object, naming the field that is wrong and never quoting
    /// a value (the token is card data).
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, String> {
        let mut fields = Fields::default();
        while let Some(key) = map
            .next_key::<String>()
            .map_err(|_| "a key is not a string")?
        {
            let value: serde_json::Value = map
                .next_value()
                .map_err(|_| format!("{key} is not a JSON value"))?;
            fields.set(key, value)?;
        }
        fields.finish()
    }
}

/// The fields as read, before their checks.
#[derive(Default)]
struct Fields {
    card_token: Option<serde_json::Value>,
    expiry_month: Option<serde_json::Value>,
    expiry_year: Option<serde_json::Value>,
    holder_id: Option<serde_json::Value>,
    holder_name: Option<serde_json::Value>,
    info: Option<serde_json::Value>,
}

impl Fields {
    fn set(&mut self, key: String, value: serde_json::Value) -> Result<(), String> {
        let slot = match key.as_str() {
            "card_token" => &mut self.card_token,
            "expiry_month" => &mut self.expiry_month,
            "expiry_year" => &mut self.expiry_year,
            "holder_id" => &mut self.holder_id,
            "holder_name" => &mut self.holder_name,
            "info" => &mut self.info,
            _ => {
                return Err(format!(
                    "unknown field {key:?}; expected card_token, expiry_month, expiry_year, \
                     holder_id, holder_name, info"
                ))
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("the key {key:?} is given twice"));
        }
        Ok(())
    }

    fn finish(self) -> Result<PayoutTarget, String> {
        let card_token = text(self.card_token, "card_token")?
            .and_then(|t| CardToken::parse(&t))
            .ok_or("card_token must be the card's 19-digit token")?;
        let expiry_month = text(self.expiry_month, "expiry_month")?
            .filter(|m| m.len() == 2 && matches!(m.parse::<u8>(), Ok(1..=12)))
            .ok_or("expiry_month must be the card's expiry month as MM (01 to 12)")?;
        let expiry_year = text(self.expiry_year, "expiry_year")?
            .filter(|y| y.len() == 2 && y.bytes().all(|b| b.is_ascii_digit()))
            .ok_or("expiry_year must be the card's expiry year as YY")?;
        let holder_id = match text(self.holder_id, "holder_id")? {
            Some(id) if id.len() == 9 && id.bytes().all(|b| b.is_ascii_digit()) => Some(id),
            Some(_) => return Err("holder_id must be 9 digits (or be left out)".into()),
            None => None,
        };
        let holder_name = text(self.holder_name, "holder_name")?
            .filter(|n| !n.trim().is_empty() && n.chars().count() <= 64)
            .ok_or("holder_name must be the holder's first name (1 to 64 characters)")?;
        let info = text(self.info, "info")?;
        if info.as_ref().is_some_and(|i| i.chars().count() > 256) {
            return Err("info is longer than 256 characters".into());
        }
        Ok(PayoutTarget {
            card_token,
            expiry_month,
            expiry_year,
            holder_id,
            holder_name,
            info,
        })
    }
}

/// A string field: `None` when absent or null, an error naming the field
/// when it is another type.
fn text(value: Option<serde_json::Value>, field: &str) -> Result<Option<String>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

impl<'de> Deserialize<'de> for PayoutTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Target;
        impl<'de> Visitor<'de> for Target {
            type Value = PayoutTarget;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with card_token, expiry_month, expiry_year, holder_name")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PayoutTarget, A::Error> {
                PayoutTarget::from_map(map).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_map(Target)
    }
}

/// Masks every `card_token` string in a body about to leave the worker
/// (a dead letter): in a JSON object at any depth, or, in a body that is
/// not JSON, after any `"card_token"` key the text shows. Other bytes stay
/// as they were; a body without the key is returned unchanged.
pub fn mask_card_tokens(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    const KEY: &[u8] = b"\"card_token\"";
    if !body.windows(KEY.len()).any(|w| w == KEY) {
        return std::borrow::Cow::Borrowed(body);
    }
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) {
        mask_value(&mut value);
        return std::borrow::Cow::Owned(serde_json::to_vec(&value).unwrap_or_default());
    }
    std::borrow::Cow::Owned(mask_text(body))
}

fn mask_value(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                match inner {
                    serde_json::Value::String(s) if key == "card_token" => *s = mask_string(s),
                    serde_json::Value::Number(n) if key == "card_token" => {
                        *inner = serde_json::Value::String(mask_string(&n.to_string()));
                    }
                    other => mask_value(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_value),
        _ => {}
    }
}

/// A message with every run of 6 or more digits starred: what an error
/// about the `payout` object may say of a value.
pub(super) fn mask_digit_runs(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 6 {
            out.push_str(&"*".repeat(run.len()));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in message.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A value an edit puts at or under `payout`, masked: a string or number
/// as a token would be, an object's `card_token` keys.
pub fn mask_payout_value(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::String(s) => serde_json::Value::String(mask_string(s)),
        serde_json::Value::Number(n) => serde_json::Value::String(mask_string(&n.to_string())),
        other => {
            let mut masked = other.clone();
            mask_value(&mut masked);
            masked
        }
    }
}

/// Stars for everything but the last four characters.
fn mask_string(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let keep = chars.len().saturating_sub(4);
    let tail: String = chars[keep..].iter().collect();
    format!("{}{tail}", "*".repeat(keep.max(TOKEN_DIGITS - 4)))
}

/// A body that is not JSON: every digit between a `"card_token"` key and
/// the end of its value (the next `,`, `}` or line end) becomes a star,
/// except none is kept (the shape of the text is unknown).
fn mask_text(body: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"card_token\"";
    let mut out = body.to_vec();
    let mut i = 0;
    while let Some(at) = out[i..].windows(KEY.len()).position(|w| w == KEY) {
        let mut j = i + at + KEY.len();
        while j < out.len() && !matches!(out[j], b',' | b'}' | b'\n') {
            if out[j].is_ascii_digit() {
                out[j] = b'*';
            }
            j += 1;
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "4724478937284730772";

    fn parse(json: &str) -> Result<PayoutTarget, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_the_documented_example_and_masks_the_token_in_debug() {
        let target = parse(&format!(
            r#"{{"card_token":"{TOKEN}","expiry_month":"05","expiry_year":"31","holder_id":"203269535","holder_name":"Jenny","info":"goodwill credit"}}"#
        ))
        .expect("valid");
        assert_eq!(target.card_token.expose(), TOKEN);
        assert_eq!(target.echo().card_last4, "0772");
        let debug = format!("{target:?}");
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(debug.contains("***************0772"), "{debug}");
        let masked = serde_json::to_string(&target.masked()).expect("json");
        assert!(!masked.contains(TOKEN), "{masked}");
    }

    #[test]
    fn names_each_wrong_field_and_never_quotes_the_token() {
        let cases = [
            (
                r#"{"expiry_month":"05","expiry_year":"31","holder_name":"J"}"#,
                "card_token",
            ),
            (
                r#"{"card_token":"472447893728473077","expiry_month":"05","expiry_year":"31","holder_name":"J"}"#,
                "card_token",
            ),
            (
                r#"{"card_token":4724478937284730772,"expiry_month":"05","expiry_year":"31","holder_name":"J"}"#,
                "card_token",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"5","expiry_year":"31","holder_name":"J"}"#,
                "expiry_month",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"13","expiry_year":"31","holder_name":"J"}"#,
                "expiry_month",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"2031","holder_name":"J"}"#,
                "expiry_year",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"31"}"#,
                "holder_name",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"31","holder_name":" "}"#,
                "holder_name",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"31","holder_name":"J","holder_id":"12"}"#,
                "holder_id",
            ),
            (
                r#"{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"31","holder_name":"J","pan":"1"}"#,
                "pan",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err(json);
            assert!(err.contains(field), "{json}: {err}");
            assert!(!err.contains("472447893728473077"), "{err}");
        }
    }

    #[test]
    fn a_rejection_never_quotes_a_token_given_in_the_wrong_shape() {
        for payout in [
            format!("\"{TOKEN}\""),
            TOKEN.to_string(),
            format!("[\"{TOKEN}\"]"),
        ] {
            let body = format!(
                r#"{{"refund_id":"po-1","provider":"h","operation":"payout","amount":{{"minor":1,"currency":"ILS"}},"payout":{payout}}}"#
            );
            let err = format!("{:?}", super::super::RefundCommand::parse(body.as_bytes()));
            assert!(!err.contains("4724478937"), "{err}");
            assert!(err.contains("payout"), "{err}");
        }
        let twice = parse(&format!(
            r#"{{"card_token":"{TOKEN}","card_token":"{TOKEN}","expiry_month":"05","expiry_year":"31","holder_name":"J"}}"#
        ));
        assert!(twice.is_err_and(|e| e.contains("twice")));
    }

    #[test]
    fn an_edit_of_the_whole_payout_object_is_masked() {
        let v = serde_json::json!({"card_token": TOKEN, "holder_name": "J"});
        let masked = mask_payout_value(&v).to_string();
        assert!(
            !masked.contains(TOKEN) && masked.contains("0772"),
            "{masked}"
        );
        let bare = mask_payout_value(&serde_json::json!(TOKEN)).to_string();
        assert!(!bare.contains("47244789"), "{bare}");
    }

    #[test]
    fn a_masked_token_reads_back_as_masked() {
        let target = parse(
            r#"{"card_token":"***************0772","expiry_month":"05","expiry_year":"31","holder_name":"J"}"#,
        )
        .expect("masked form");
        assert!(target.card_token.is_masked());
        assert_eq!(target.card_token.last4(), "0772");
        assert!(parse(
            r#"{"card_token":"**0772","expiry_month":"05","expiry_year":"31","holder_name":"J"}"#
        )
        .is_err());
    }

    #[test]
    fn bodies_leave_with_their_tokens_masked() {
        let json = format!(r#"{{"refund_id":"p-1","payout":{{"card_token":"{TOKEN}"}}}}"#);
        let out = mask_card_tokens(json.as_bytes());
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains(TOKEN) && text.contains("0772"), "{text}");
        let broken = format!(r#"{{"refund_id":"p-1","payout":{{"card_token":"{TOKEN}""#);
        let out = mask_card_tokens(broken.as_bytes());
        assert!(
            !String::from_utf8_lossy(&out).contains("4724"),
            "not JSON: masked whole"
        );
        let plain = br#"{"refund_id":"r-1"}"#;
        assert!(matches!(
            mask_card_tokens(plain),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
