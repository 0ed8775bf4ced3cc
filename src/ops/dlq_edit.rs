//! Edit and replay, pure part: `--set path=value` changes applied to a
//! dead-lettered command, the diff an operator sees before anything
//! happens, and the header chain that keeps every edit on the message
//! (`x-refund-edits`: a JSON array of `{at, by, reason, changes,
//! original_body}`, the newest last).
//!
//! `refund_id` cannot be changed (it is the refund), and the body must be a
//! JSON object: a body that is not JSON is the sender's to fix.

use serde_json::{Map, Value};

/// The header that carries the chain of edits.
pub const HEADER_EDITS: &str = "x-refund-edits";

/// One `--set`: a dotted path into the command and its new value.
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    /// `transaction.id` is `["transaction", "id"]`.
    pub path: Vec<String>,
    /// JSON if the text parses as JSON (`1000`, `true`, `{"a":1}`), else the
    /// text as a string (`hyp_pay`, `12290620` stays a number: quote it as
    /// `"12290620"` for a string).
    pub value: Value,
}

/// What an edit changed at one path.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// Dotted path.
    pub path: String,
    /// Before (`null` when absent).
    pub from: Value,
    /// After.
    pub to: Value,
}

impl Change {
    /// A change under `payout` as it may be shown and kept in a header: a
    /// card token by its last four digits only.
    fn masked(self) -> Self {
        let token_or_object = self.path == "payout.card_token" || self.path == "payout";
        let mask = |v: Value| {
            if token_or_object || v.is_object() {
                crate::contract::command::mask_payout_value(&v)
            } else {
                v
            }
        };
        Change {
            path: self.path,
            from: mask(self.from),
            to: mask(self.to),
        }
    }
}

/// Parses `path=value` arguments.
pub fn parse_sets(args: &[String]) -> Result<Vec<Set>, String> {
    if args.is_empty() {
        return Err("nothing to change: give --set path=value".into());
    }
    args.iter()
        .map(|arg| {
            let (path, value) = arg
                .split_once('=')
                .ok_or_else(|| format!("--set {arg:?}: expected path=value"))?;
            let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(format!("--set {arg:?}: empty path segment"));
            }
            if path[0] == "refund_id" {
                return Err(
                    "refund_id cannot be changed: it is the refund (publish a new command instead)"
                        .into(),
                );
            }
            let value =
                serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
            Ok(Set { path, value })
        })
        .collect()
}

/// Applies `sets` to a command body; the new body and what changed.
pub fn apply(body: &[u8], sets: &[Set]) -> Result<(Value, Vec<Change>), String> {
    let mut command: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the dead-lettered body is not JSON ({e}): the sender must fix it"))?;
    if !command.is_object() {
        return Err("the dead-lettered body is not a JSON object".into());
    }
    let payout = command.get("operation").and_then(Value::as_str) == Some("payout");
    if payout && sets.iter().any(|s| s.path[0] == "amount") {
        return Err(
            "the amount of a payout cannot be edited: abandon it and publish a new payout".into(),
        );
    }
    let mut changes = Vec::new();
    for set in sets {
        let mut node = &mut command;
        for segment in &set.path[..set.path.len() - 1] {
            let object = node
                .as_object_mut()
                .ok_or_else(|| format!("{}: not an object on the way", set.path.join(".")))?;
            node = object
                .entry(segment.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        let object = node
            .as_object_mut()
            .ok_or_else(|| format!("{}: not an object on the way", set.path.join(".")))?;
        let last = &set.path[set.path.len() - 1];
        let from = object.get(last).cloned().unwrap_or(Value::Null);
        // A token typed bare reads as a number; the command wants text.
        let value = match &set.value {
            Value::Number(n) if last == "card_token" => Value::String(n.to_string()),
            other => other.clone(),
        };
        if from != value {
            object.insert(last.clone(), value.clone());
            let change = Change {
                path: set.path.join("."),
                from,
                to: value,
            };
            changes.push(if set.path[0] == "payout" {
                change.masked()
            } else {
                change
            });
        }
    }
    if changes.is_empty() {
        return Err("the --set values are what the command already says: nothing to change".into());
    }
    Ok((command, changes))
}

/// The diff an operator reviews, one line per change.
pub fn diff(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|c| format!("  {}: {} -> {}\n", c.path, c.from, c.to))
        .collect()
}

/// The header chain with this edit appended.
pub fn chain(
    previous: Option<&str>,
    by: &str,
    reason: &str,
    changes: &[Change],
    original_body: &[u8],
) -> String {
    let mut edits: Vec<Value> = previous
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_default();
    edits.push(serde_json::json!({
        "at": crate::contract::event::now_rfc3339(),
        "by": by,
        "reason": reason,
        "changes": changes,
        "original_body": String::from_utf8_lossy(&crate::contract::command::mask_card_tokens(original_body)),
    }));
    Value::Array(edits).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_apply_with_a_diff_and_refund_id_is_refused() {
        let body = br#"{"refund_id":"rf-1","provider":"hyp_bad","transaction":{"id":"1"}}"#;
        let sets = parse_sets(&[
            "provider=hyp_pay".to_string(),
            "transaction.id=\"2\"".to_string(),
            "amount={\"minor\":100,\"currency\":\"ILS\"}".to_string(),
        ])
        .expect("sets");
        let (command, changes) = apply(body, &sets).expect("applied");
        assert_eq!(command["provider"], "hyp_pay");
        assert_eq!(command["transaction"]["id"], "2");
        assert_eq!(command["amount"]["minor"], 100);
        assert_eq!(changes.len(), 3);
        assert!(diff(&changes).contains("provider: \"hyp_bad\" -> \"hyp_pay\""));
        assert!(parse_sets(&["refund_id=x".to_string()]).is_err());
        assert!(parse_sets(&["no-equals".to_string()]).is_err());
        assert!(apply(b"not json", &sets).is_err());
        let same = parse_sets(&["provider=hyp_bad".to_string()]).expect("sets");
        assert!(apply(body, &same).is_err(), "no change is refused");
        let chained = chain(None, "dana", "typo", &changes, body);
        let chained = chain(Some(&chained), "eli", "again", &changes, body);
        let edits: Vec<Value> = serde_json::from_str(&chained).expect("json");
        assert_eq!(edits.len(), 2);
        assert_eq!(edits[1]["by"], "eli");
    }
}
