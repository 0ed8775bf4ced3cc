#![no_main]
//! See src/fuzzing.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| refund_worker::fuzzing::store_record(data));
