//! Test data: the fixtures in `tests/fixtures` (written for these tests, so they are in
//! every clone) and the recorded corpus of real traffic, which is not in the repository.
//! Both have one layout: `filters/secrets.jsonl`, `filters/injections.jsonl` and
//! `nohumans/ROOM.jsonl` (see tests/fixtures/README.md).
//!
//! A test over the corpus is `#[ignore]`d and reads the folder named by `ROOST_CORPUS`
//! (relative to the repository's root when relative); [`over_data!`] writes a test
//! twice, once over the fixtures and once, ignored, over the corpus:
//!
//! ```text
//! ROOST_CORPUS=/path/to/corpus cargo test -p roost --lib --test integration -- --ignored recorded_corpus
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::guests::repo_root;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The recorded corpus named by `ROOST_CORPUS`; panics saying how to name it.
pub fn corpus() -> PathBuf {
    let Some(dir) = std::env::var_os("ROOST_CORPUS") else {
        panic!(
            "this test reads the recorded corpus: set ROOST_CORPUS to its folder (with filters/ and nohumans/)"
        );
    };
    // Joining an absolute path replaces the root.
    let dir = repo_root().join(dir);
    assert!(
        dir.join("filters").is_dir() && dir.join("nohumans").is_dir(),
        "ROOST_CORPUS names {}, which lacks filters/ or nohumans/",
        dir.display()
    );
    dir
}

/// `DIR/nohumans/ROOM.jsonl`.
pub fn room(dir: &Path, room: &str) -> PathBuf {
    let p = dir.join("nohumans").join(format!("{room}.jsonl"));
    assert!(p.is_file(), "no chat log {}", p.display());
    p
}

/// The rooms of `DIR/nohumans`, sorted.
pub fn rooms(dir: &Path) -> Vec<String> {
    let mut rooms: Vec<String> = std::fs::read_dir(dir.join("nohumans"))
        .unwrap_or_else(|e| panic!("cannot read {}/nohumans: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    rooms.sort();
    assert!(!rooms.is_empty(), "no chat logs in {}", dir.display());
    rooms
}

/// Every non-empty line of a JSON-lines file, parsed.
pub fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// Every line of every `DIR/nohumans/*.jsonl`: (file name, record).
pub fn chat(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for r in rooms(dir) {
        for rec in jsonl(&room(dir, &r)) {
            out.push((format!("{r}.jsonl"), rec));
        }
    }
    out
}

/// `over_data!(body: fixtures_test, recorded_corpus_test)` defines two tests calling
/// `body(&Path)`: one over [`fixtures`], one over [`corpus`], ignored unless asked
/// for. The second name must contain `recorded_corpus` (`.ci/run` selects by it).
macro_rules! over_data {
    ($body:ident: $fixtures:ident, $recorded:ident) => {
        #[test]
        fn $fixtures() {
            $body(&$crate::fixtures::fixtures())
        }

        #[test]
        #[ignore = "reads the recorded corpus: set ROOST_CORPUS to its folder"]
        fn $recorded() {
            $body(&$crate::fixtures::corpus())
        }
    };
}
pub(crate) use over_data;
