//! The published contract (`docs/asyncapi.yaml`, `docs/schemas/`) checked
//! against the code: every example command matches the command schema (and
//! the invalid one does not), and the events the worker builds match the
//! event schema. Every event the integration tests receive is checked too
//! (`support::TestApp::next_event`).

use crate::support;

use refund_worker::contract::command::{Echo, Operation};
use refund_worker::contract::event::{OutcomeEvent, Status};
use serde_json::Value;

fn command_schema() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(include_str!(
        "../../docs/schemas/refund-command.schema.json"
    ))
    .expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("a valid schema")
}

#[test]
fn every_example_command_matches_the_schema_and_the_invalid_one_does_not() {
    let schema = command_schema();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "sandbox-seed.json" {
            continue;
        }
        let example: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let errors: Vec<String> = schema
            .iter_errors(&example)
            .map(|e| e.to_string())
            .collect();
        if name == "invalid-command.json" {
            assert!(!errors.is_empty(), "{name} should not match");
        } else {
            assert!(errors.is_empty(), "{name}: {errors:?}");
            // And the worker reads it the same way.
            refund_worker::contract::command::RefundCommand::parse(example.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} examples");
}

#[test]
fn events_of_every_status_match_the_schema() {
    let echo = Echo {
        provider: Some("hyp_pay".into()),
        operation: Some(Operation::Refund),
        amount: None,
        order_id: Some("ord-1".into()),
        metadata: Some(serde_json::json!({"any": "json"})),
        payout: Some(refund_worker::contract::command::PayoutEcho {
            card_last4: "0772".into(),
        }),
    };
    for status in [
        Status::Succeeded,
        Status::Failed,
        Status::Rejected,
        Status::Pending,
        Status::InDoubt,
    ] {
        let mut event = OutcomeEvent::new("rf-1", status, &echo, 1);
        if status == Status::Failed {
            event = event.with_error("abandoned", "by dana: ticket");
        }
        support::assert_matches_event_schema(&serde_json::to_value(&event).expect("json"));
    }
    let bad = serde_json::json!({"event_id": "x", "refund_id": "rf-1"});
    assert!(!support::event_schema().is_valid(&bad));
}
