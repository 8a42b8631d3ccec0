//! Fuzz target `set_cookie`: see `harness::set_cookie`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::set_cookie(data));
