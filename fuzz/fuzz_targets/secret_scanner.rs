//! The secret scanner (host/src/policy/secrets.rs) with a few known secrets.
//!
//! Oracles: no panic; a scan is deterministic; a known secret is caught whatever text
//! surrounds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost::policy::secrets::scan_formats;
use roost::policy::{SecretScanner, SecretsConfig, normalize};
use std::sync::LazyLock;

const KNOWN: &str = "rk_live_Q7fT2mZ9xW4cV8bN1pL6";

static SCANNER: LazyLock<SecretScanner> = LazyLock::new(|| {
    let scanner = SecretScanner::new(SecretsConfig::default());
    scanner.add_known_secret(KNOWN);
    scanner.add_known_secret("chat-key-0f9e8d7c6b5a4f3e2d1c");
    scanner
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let first = SCANNER.scan(&text);
    assert_eq!(SCANNER.scan(&text), first, "scan is deterministic");
    let _ = scan_formats(&text);
    let _ = normalize(&text);
    // Wrapped in ordinary text on both sides, the known secret is always caught.
    if text.len() < 4096 {
        let half = text.len() / 2;
        let mut cut = half;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let wrapped = format!("{} {KNOWN} {}", &text[..cut], &text[cut..]);
        assert!(
            SCANNER.scan(&wrapped).is_some(),
            "known secret missed in {wrapped:?}"
        );
    }
});
