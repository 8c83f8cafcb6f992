//! `keel_config::parse_go_duration` (flag values, `--auth-token` TTLs, proxy flags) on arbitrary
//! text: it answers or refuses, never panics, and what it accepts is a finite duration that
//! prints back in a form it accepts again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(d) = keel_config::parse_go_duration(s) {
        let again = keel_config::parse_go_duration(&format!("{}ns", d.as_nanos()));
        assert!(again.is_some() || d.as_nanos() > u64::MAX as u128, "{s:?} -> {d:?} does not parse back");
    }
});
