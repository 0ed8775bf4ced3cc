//! Every decoder of outside input, as one function each that takes raw
//! bytes and must not panic, hang or allocate without bound whatever they
//! are. The cargo-fuzz targets in `fuzz/` call these, and so does the
//! bounded property run on stable Rust in `tests/decoders.rs` (CI), which
//! feeds them the documentation's examples, mutations of them and random
//! bytes.
//!
//! Each function also checks what must hold for the inputs a decoder
//! accepts, so a fuzzer finds wrong answers as well as crashes.

use crate::contract::command::{Operation, ParseError, RefundCommand};
use crate::providers::{creditguard, hyp_pay, paynet, ProviderOutcome};
use lapin::BasicProperties;

/// One decoder under test.
pub type Target = fn(&[u8]);

/// The targets by name, for the property run and `fuzz/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("command", command),
    ("hyp_pay_answer", hyp_pay_answer),
    ("creditguard_answer", creditguard_answer),
    ("paynet_answer", paynet_answer),
    ("paynet_callback", paynet_callback),
    ("dead_letter_headers", dead_letter_headers),
    ("store_record", store_record),
];

/// A refund command body.
pub fn command(data: &[u8]) {
    match RefundCommand::parse(data) {
        Ok(command) => {
            // An accepted command has a valid id and hashes stably.
            assert!(!command.refund_id.is_empty() && command.refund_id.len() <= 64);
            assert_eq!(command.payload_hash(), command.payload_hash());
            let _ = command.echo();
        }
        Err(ParseError::Invalid(invalid)) => {
            assert!(!invalid.refund_id.is_empty());
        }
        Err(ParseError::Poison(_)) => {}
    }
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

fn sane(outcome: &ProviderOutcome) {
    if let ProviderOutcome::Confirmed { code, .. } = outcome {
        assert!(!code.is_empty(), "a confirmation names the provider's code");
    }
}

/// A Hyp Pay answer body (URL-encoded fields).
pub fn hyp_pay_answer(data: &[u8]) {
    let body = text(data);
    for operation in [Operation::Refund, Operation::Cancel] {
        sane(&hyp_pay::wire::classify(operation, &body));
    }
}

/// A CreditGuard XML answer.
pub fn creditguard_answer(data: &[u8]) {
    let body = text(data);
    let _ = creditguard::wire::parse_response(&body);
    for operation in [Operation::Refund, Operation::Cancel] {
        sane(&creditguard::wire::classify(operation, &body));
    }
}

/// A Paynet answer: the first two bytes choose the HTTP status.
pub fn paynet_answer(data: &[u8]) {
    let (status, body) = match data {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]) % 600, rest),
        _ => (200, data),
    };
    sane(&paynet::wire::classify(status, &text(body)));
}

/// A body posted to a Paynet callback URL.
pub fn paynet_callback(data: &[u8]) {
    if let Ok(callback) = paynet::wire::parse_callback(data) {
        assert!(callback.code == "0" || callback.code == "1");
    }
}

/// The headers of a dead-lettered message as the broker delivers them (an
/// AMQP field table), read the way `dlq list` reads them.
pub fn dead_letter_headers(data: &[u8]) {
    let Ok((rest, headers)) = lapin::types::parsing::parse_field_table(data) else {
        return;
    };
    let properties = BasicProperties::default().with_headers(headers);
    let message = crate::ops::dlq::describe_message(rest.to_vec(), properties);
    let _ = serde_json::to_string(&message);
}

/// A stored refund record, in either form (`store/codec.rs`): what a
/// damaged disk could hand the store. Whatever decodes comes back the same
/// through the compact form, and the census's glance agrees with it.
pub fn store_record(data: &[u8]) {
    use crate::store::codec::{decode, encode, glance, RecordFormat};
    let _ = glance(data);
    if let Ok(record) = decode(data) {
        let compact = encode(&record, RecordFormat::Compact);
        assert_eq!(decode(&compact).ok().as_ref(), Some(&record));
        let seen = glance(&compact).expect("glance of a record just encoded");
        assert_eq!(seen.state, record.state.name());
        assert_eq!(seen.provider, record.command.provider);
    }
}
