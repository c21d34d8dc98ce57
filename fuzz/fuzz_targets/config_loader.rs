//! The config loader (host/src/config.rs): TOML parsing, validation, the settings
//! secret check, and the derived runtime and session configs.
//!
//! Oracles: no panic; a config that loads serialises and loads back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    let _ = config.check_settings_hold_no_secrets();
    let _ = config.runtime_config();
    let _ = config.session_config();
    for label in config.personas.keys() {
        let _ = config.limits_for(label);
    }
    let toml = config.to_toml().expect("a loaded config serialises");
    let again = Config::parse(&toml, "again.toml").expect("a serialised config loads");
    assert_eq!(again.to_toml().ok(), Some(toml));
});
