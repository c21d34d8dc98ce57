//! The prompt-injection detector (host/src/policy/injection.rs).
//!
//! Oracles: no panic; the verdict is deterministic and its score is the sum of the
//! matched families. In this build debug assertions are on, so the detector also checks
//! that its prefilter never hides a rule's match (a `debug_assert_eq!` in `detect`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost::policy::injection::detect;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let v = detect(&text);
    assert!(v.score.is_finite() && v.score >= 0.0);
    let sum: f32 = v.matched.iter().map(|(_, w)| w).sum();
    assert!((sum - v.score).abs() < 1e-3, "{v:?}");
    assert_eq!(v.rule, v.matched.first().map(|(f, _)| *f));
    assert_eq!(detect(&text), v, "detect is deterministic");
});
