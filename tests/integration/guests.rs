//! Test guests and example personas, built from source for the tests that need them.
//!
//! [`guest`] builds the whole `tests/guests` workspace once per test process and
//! returns `tests/guests/target/wasm/NAME.wasm`; [`example`] builds the `plugins/`
//! workspace once and returns the component of `echo` or `greeter`:
//!
//! ```ignore
//! let looping = guests::guest("loop");   // tests/guests/target/wasm/loop.wasm
//! let echo = guests::example("echo");    // plugins/target/wasm32-wasip2/release/echo.wasm
//! ```
//!
//! Each workspace builds with `cargo build --release --target wasm32-wasip2` into its
//! own target dir (`CARGO_TARGET_DIR` is removed from cargo's environment), so these
//! builds never wait on the host's target lock. A failed build panics with cargo's
//! stderr, in every test that asked for a guest.
//!
//! The test guests (see each one's `//!` docs in tests/guests/NAME/src/lib.rs), all of
//! which answer the text `ping` with `pong from NAME` unless noted:
//! `loop`, `membomb`, `recursion`, `panic`, `bigreply` (hostile), `escape`
//! (sandbox probes, JSON report), `hoarder` (calls every host function, JSON report),
//! `counter` (well-behaved, `N: TEXT`, no ping), `echo-v2` (a changed `echo` named
//! `echo`, in `lobby` and `builders`, that answers `v2: TEXT`, for hot reload; no
//! ping), `notebook` (`set K V` / `get K` over kv, `ask Q` over llm, for shadows), `teller`
//! (says, joins or logs the pieces of its `lines` setting, one per message), `kvloop`
//! (calls `kv.set` forever: host time), `roomhopper` (joins rooms on request),
//! `wrong-world` and `future-version` (refused at load).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// The target the guests are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Every test guest in `tests/guests`.
pub const GUESTS: &[&str] = &[
    "loop",
    "membomb",
    "recursion",
    "panic",
    "bigreply",
    "escape",
    "hoarder",
    "wrong-world",
    "future-version",
    "counter",
    "chatter",
    "echo-v2",
    "notebook",
    "teller",
    "kvloop",
    "roomhopper",
];

/// Every example persona in `plugins/`.
pub const EXAMPLES: &[&str] = &["echo", "greeter"];

/// The repository's root (the host crate lives in `host/`).
pub fn repo_root() -> PathBuf {
    let host = Path::new(env!("CARGO_MANIFEST_DIR"));
    host.parent().unwrap_or(host).to_owned()
}

/// The component of test guest `name` (one of [`GUESTS`]), built on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match BUILT.get_or_init(|| build_guests(&repo_root().join("tests/guests"))) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "no test guest `{name}` (have: {GUESTS:?}); looked for {}",
        path.display()
    );
    path
}

/// The component of example persona `name` (one of [`EXAMPLES`]), built on first use.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match BUILT.get_or_init(|| build_workspace(&repo_root().join("plugins"))) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "no example persona `{name}` (have: {EXAMPLES:?}); looked for {}",
        path.display()
    );
    path
}

/// Builds the cargo workspace at `dir` for [`TARGET`] in release mode into
/// `dir/target`; returns the folder holding the `.wasm` files.
fn build_workspace(dir: &Path) -> Result<PathBuf, String> {
    let target_dir = dir.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    eprintln!("building {} for {TARGET} ...", dir.display());
    let output = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--color=never",
            "--manifest-path",
        ])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .map_err(|e| {
            format!(
                "could not run {} to build {}: {e}",
                cargo.to_string_lossy(),
                dir.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "building {} for {TARGET} failed ({}); if the target is missing, run `rustup target add {TARGET}`\n{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    eprintln!("built {} in {:.1?}", dir.display(), started.elapsed());
    Ok(target_dir.join(TARGET).join("release"))
}

/// Builds `tests/guests` and copies each `guest_NAME.wasm` (package `guest-NAME`) to
/// `target/wasm/NAME.wasm`, under a temporary name and a rename, so a test that
/// already holds the path never sees a half-written file.
fn build_guests(dir: &Path) -> Result<PathBuf, String> {
    let built = build_workspace(dir)?;
    let out = dir.join("target").join("wasm");
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("could not create {}: {e}", out.display()))?;
    for name in GUESTS {
        let from = built.join(format!("guest_{}.wasm", name.replace('-', "_")));
        let to = out.join(format!("{name}.wasm"));
        let tmp = out.join(format!(".{name}.wasm.{}", std::process::id()));
        std::fs::copy(&from, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &to))
            .map_err(|e| format!("could not copy {} to {}: {e}", from.display(), to.display()))?;
    }
    Ok(out)
}

/// The names a component imports and exports at its top level, e.g.
/// `roost:persona/log@0.1.0` and `on-message`.
pub fn component_names(wasm: &Path) -> (Vec<String>, Vec<String>) {
    use wasmparser::{Parser, Payload};
    let bytes = std::fs::read(wasm).unwrap_or_else(|e| panic!("read {}: {e}", wasm.display()));
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.unwrap_or_else(|e| panic!("parse {}: {e}", wasm.display())) {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth -= 1,
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    imports.push(import.expect("import").name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    exports.push(export.expect("export").name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    (imports, exports)
}

/// Whether `wasm` starts like a component (not a core module).
pub fn is_component(wasm: &Path) -> bool {
    let bytes = std::fs::read(wasm).unwrap_or_default();
    bytes.starts_with(b"\0asm") && bytes.get(4..8) == Some(&[0x0d, 0x00, 0x01, 0x00])
}

#[test]
fn every_test_guest_is_a_component() {
    for name in GUESTS {
        let path = guest(name);
        assert!(
            is_component(&path),
            "{name}: {} is not a component",
            path.display()
        );
    }
}

#[test]
fn personas_export_the_persona_world() {
    let personas = [
        "loop",
        "membomb",
        "recursion",
        "panic",
        "bigreply",
        "escape",
        "hoarder",
        "counter",
    ];
    for path in personas
        .iter()
        .map(|n| guest(n))
        .chain(EXAMPLES.iter().map(|n| example(n)))
    {
        let (imports, exports) = component_names(&path);
        assert_eq!(exports, ["describe", "on-message"], "{}", path.display());
        let foreign: Vec<_> = imports
            .iter()
            // Plain names (`manifest`, `message`, `action`) are the world's type imports.
            .filter(|i| i.contains(':'))
            .filter(|i| !i.starts_with("roost:persona/") && !i.starts_with("wasi:"))
            .collect();
        assert!(
            foreign.is_empty(),
            "{}: unexpected imports {foreign:?}",
            path.display()
        );
        assert!(
            imports
                .iter()
                .filter(|i| i.starts_with("roost:persona/"))
                .all(|i| i.ends_with("@0.1.0")),
            "{}: {imports:?}",
            path.display()
        );
    }
}

#[test]
fn hoarder_imports_every_capability() {
    let (imports, _) = component_names(&guest("hoarder"));
    for capability in ["llm", "kv", "history", "log", "config"] {
        let name = format!("roost:persona/{capability}@0.1.0");
        assert!(
            imports.contains(&name),
            "hoarder does not import {name}: {imports:?}"
        );
    }
}

#[test]
fn escape_imports_sockets_and_filesystem() {
    let (imports, _) = component_names(&guest("escape"));
    for wanted in [
        "wasi:sockets/tcp@",
        "wasi:sockets/ip-name-lookup@",
        "wasi:filesystem/preopens@",
        "wasi:cli/environment@",
    ] {
        assert!(
            imports.iter().any(|i| i.starts_with(wanted)),
            "escape does not import {wanted}*: {imports:?}"
        );
    }
}

#[test]
fn odd_guests_are_not_persona_0_1() {
    let (imports, exports) = component_names(&guest("wrong-world"));
    assert!(
        !exports.iter().any(|e| e == "on-message" || e == "describe"),
        "{exports:?}"
    );
    assert!(
        exports
            .iter()
            .any(|e| e.starts_with("roost-test:wrong-world/runner")),
        "{exports:?}"
    );
    assert!(
        !imports.iter().any(|i| i.starts_with("roost:persona/")),
        "{imports:?}"
    );

    let (imports, exports) = component_names(&guest("future-version"));
    assert_eq!(exports, ["describe", "on-message"]);
    assert!(
        imports.iter().any(|i| i == "roost:persona/config@0.2.0"),
        "{imports:?}"
    );
    assert!(
        !imports
            .iter()
            .any(|i| i.ends_with("@0.1.0") && i.starts_with("roost:")),
        "{imports:?}"
    );
}

mod roost_build {
    use std::path::Path;

    use roost::build::{BuildError, BuildOptions, CargoRunner, build_persona_with};

    fn quiet() -> CargoRunner {
        let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        CargoRunner {
            program,
            echo_progress: false,
        }
    }

    fn crate_at(dir: &Path, name: &str, lib_rs: &str, cdylib: bool) {
        let crate_type = if cdylib {
            "\n[lib]\ncrate-type = [\"cdylib\"]\n"
        } else {
            ""
        };
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n{crate_type}\n[workspace]\n"),
        )
        .unwrap();
        std::fs::write(dir.join("src/lib.rs"), lib_rs).unwrap();
    }

    #[test]
    fn builds_the_echo_example() {
        let out = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            path: super::repo_root().join("plugins/echo"),
            output: Some(out.path().to_owned()),
        };
        let wasm = build_persona_with(&opts, &quiet()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(wasm, out.path().join("echo.wasm"));
        assert!(super::is_component(&wasm));
        let (_, exports) = super::component_names(&wasm);
        assert_eq!(exports, ["describe", "on-message"]);
    }

    #[test]
    fn compile_errors_are_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("broken");
        crate_at(
            &project,
            "broken",
            "pub fn f() -> u32 { not_defined }\n",
            true,
        );
        let err = build_persona_with(
            &BuildOptions {
                path: project,
                output: None,
            },
            &quiet(),
        )
        .unwrap_err();
        assert!(matches!(err, BuildError::CompileFailed { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not_defined"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(!dir.path().join("broken.wasm").exists());
    }

    #[test]
    fn a_crate_without_cdylib_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("plain-lib");
        crate_at(&project, "plain-lib", "pub fn f() -> u32 { 1 }\n", false);
        let err = build_persona_with(
            &BuildOptions {
                path: project,
                output: None,
            },
            &quiet(),
        )
        .unwrap_err();
        assert!(matches!(err, BuildError::NoArtifact(_)), "{err}");
        assert!(
            err.to_string().contains("crate-type = [\"cdylib\"]"),
            "{err}"
        );
    }

    #[test]
    fn builds_a_standalone_crate_next_to_itself() {
        // No dependencies, so this stays fast: a bare cdylib is a valid (if useless)
        // component for this purpose.
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("tiny-bot");
        crate_at(
            &project,
            "tiny-bot",
            "#[unsafe(no_mangle)]\npub extern \"C\" fn tiny() -> u32 { 7 }\n",
            true,
        );
        let wasm = build_persona_with(
            &BuildOptions {
                path: project.clone(),
                output: None,
            },
            &quiet(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(wasm, dir.path().join("tiny-bot.wasm"));
        assert!(super::is_component(&wasm));
    }

    #[test]
    fn python_and_missing_projects_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.py"), "x = 1\n").unwrap();
        let err = build_persona_with(
            &BuildOptions {
                path: dir.path().to_owned(),
                output: None,
            },
            &quiet(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("has app.py but no persona.toml"),
            "{err}"
        );

        let missing = dir.path().join("nope");
        let err = build_persona_with(
            &BuildOptions {
                path: missing,
                output: None,
            },
            &quiet(),
        )
        .unwrap_err();
        assert!(err.to_string().ends_with("does not exist"), "{err}");
    }
}
