//! Every input in `fuzz/regressions/<target>/` — what the fuzzers found, and the hand-made
//! seeds they started from — replayed through the fuzz targets' own bodies on stable, so a
//! crash found once stays fixed. See "Fuzzing" in the README.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

/// Runs `target` on every file of its regression folder; returns how many it ran.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regression folder") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("regression input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    assert!(n > 0, "no regression input for {target}");
    n
}

#[test]
fn host_parser_inputs_found_by_fuzzing_stay_fixed() {
    replay("host", harness::host);
}

#[test]
fn config_loader_inputs_found_by_fuzzing_stay_fixed() {
    replay("config", harness::config);
}

#[test]
fn location_rewriting_inputs_found_by_fuzzing_stay_fixed() {
    replay("location", harness::location);
}

#[test]
fn html_shim_inputs_found_by_fuzzing_stay_fixed() {
    replay("shim", harness::shim);
}

#[test]
fn admin_json_inputs_found_by_fuzzing_stay_fixed() {
    replay("admin_json", harness::admin_json);
}

#[test]
fn set_cookie_rewriting_inputs_found_by_fuzzing_stay_fixed() {
    replay("set_cookie", harness::set_cookie);
}
