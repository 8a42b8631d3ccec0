//! Fuzz target `admin_json`: see `harness::admin_json`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::admin_json(data));
