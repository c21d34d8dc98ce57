//! `roost build PATH [-o FILE]`: build a persona project into a component.
//!
//! A Rust persona is a cdylib crate (see `plugins/echo`). [`build_persona`] runs
//!
//! ```text
//! cargo build --release --target wasm32-wasip2 --message-format=json-render-diagnostics \
//!     --manifest-path PATH/Cargo.toml
//! ```
//!
//! passes cargo's human progress (and compiler errors) through to stderr, finds the
//! component cargo produced in its JSON artifact messages (so the crate may be
//! standalone or a member of a workspace, with any target dir), and copies it to
//! `FILE`, by default `PATH/../NAME.wasm` with NAME the package name: `roost build
//! plugins/echo` writes `plugins/echo.wasm`, in the folder `roost run` watches. The copy
//! is written under a temporary name and renamed into place, so a watcher never sees a
//! half-written component.
//!
//! Every failure is one [`BuildError`] with a one-line message saying what to do:
//! missing project, no `Cargo.toml`, a Python project (not supported yet), cargo not
//! installed, the `wasm32-wasip2` target not installed, a compile error (cargo's own
//! diagnostics are printed above it), no cdylib artifact.
//!
//! ```no_run
//! use roost::build::{BuildOptions, build_persona};
//!
//! let opts = BuildOptions { path: "plugins/echo".into(), output: None };
//! let wasm = build_persona(&opts)?;
//! assert!(wasm.ends_with("echo.wasm"));
//! # Ok::<(), roost::build::BuildError>(())
//! ```

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The target every persona is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// What `roost build` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The persona project: a directory with `Cargo.toml` (or that `Cargo.toml` itself).
    pub path: PathBuf,
    /// Where to write the component; by default `PATH/../NAME.wasm`. An existing
    /// directory means `DIR/NAME.wasm`.
    pub output: Option<PathBuf>,
}

/// How cargo is run. [`build_persona`] uses [`CargoRunner::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CargoRunner {
    /// The cargo program: `cargo` from `PATH` by default.
    pub program: OsString,
    /// Whether to pass cargo's progress and diagnostics through to stderr (they are
    /// kept either way, to explain a failure).
    pub echo_progress: bool,
}

impl Default for CargoRunner {
    fn default() -> Self {
        Self {
            program: "cargo".into(),
            echo_progress: true,
        }
    }
}

/// Why a persona could not be built. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("persona project {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} has no Cargo.toml: a Rust persona is a cargo crate with `crate-type = [\"cdylib\"]` (see `roost new`)", .0.display())]
    NoCargoToml(PathBuf),
    #[error("{} is a Python persona (app.py): Python personas are not supported yet", .0.display())]
    PythonNotSupported(PathBuf),
    #[error("could not run `{}` ({source}): is Rust installed? (rustup installs cargo)", .program.to_string_lossy())]
    CargoMissing {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("the {TARGET} target is not installed: run `rustup target add {TARGET}`")]
    TargetMissing,
    #[error("building {} failed ({status}){}", .project.display(), first_error_suffix(.first_error))]
    CompileFailed {
        project: PathBuf,
        status: ExitStatus,
        /// The first `error` line cargo printed, if any.
        first_error: Option<String>,
    },
    #[error("cargo built no {TARGET} cdylib for {}: add `[lib] crate-type = [\"cdylib\"]` to its Cargo.toml", .0.display())]
    NoArtifact(PathBuf),
    #[error("{} builds several personas ({}): build one of them", .project.display(), .names.join(", "))]
    SeveralArtifacts {
        project: PathBuf,
        names: Vec<String>,
    },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn first_error_suffix(first: &Option<String>) -> String {
    first.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

/// Builds the persona project `opts.path` for [`TARGET`] and copies the component to
/// its output; returns the path written.
pub fn build_persona(opts: &BuildOptions) -> Result<PathBuf, BuildError> {
    build_persona_with(opts, &CargoRunner::default())
}

/// [`build_persona`] with an explicit cargo.
pub fn build_persona_with(opts: &BuildOptions, cargo: &CargoRunner) -> Result<PathBuf, BuildError> {
    let project = project_dir(&opts.path)?;
    let manifest = project.join("Cargo.toml");
    let manifest_abs = std::fs::canonicalize(&manifest).map_err(|source| BuildError::Io {
        what: "could not read",
        path: manifest.clone(),
        source,
    })?;
    tracing::debug!(project = %project.display(), "building persona");

    let run = run_cargo(cargo, &manifest)?;
    if !run.status.success() {
        return Err(classify_failure(&project, run.status, &run.stderr));
    }
    let artifact = select_artifact(&project, &manifest_abs, &run.artifacts)?;
    let output = output_path(&project, opts.output.as_deref(), &artifact.package)?;
    copy_atomically(&artifact.wasm, &output)?;
    tracing::debug!(package = %artifact.package, output = %output.display(), "persona built");
    Ok(output)
}

/// The project directory named by `path`, after checking what kind of project it is.
fn project_dir(path: &Path) -> Result<PathBuf, BuildError> {
    if !path.exists() {
        return Err(BuildError::NotFound(path.to_owned()));
    }
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == "Cargo.toml") {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    } else {
        path.to_owned()
    };
    if !dir.is_dir() {
        return Err(BuildError::NoCargoToml(dir));
    }
    if dir.join("Cargo.toml").is_file() {
        Ok(dir)
    } else if dir.join("app.py").is_file() {
        Err(BuildError::PythonNotSupported(dir))
    } else {
        Err(BuildError::NoCargoToml(dir))
    }
}

/// A component cargo produced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Artifact {
    /// The package's name (not the library's, which has `_` for `-`).
    package: String,
    /// The package's `Cargo.toml`, as cargo reports it (absolute).
    manifest: PathBuf,
    /// The `.wasm` file.
    wasm: PathBuf,
}

/// What one cargo run left behind.
struct CargoRun {
    status: ExitStatus,
    artifacts: Vec<Artifact>,
    /// cargo's stderr, without colour codes.
    stderr: Vec<String>,
}

fn run_cargo(cargo: &CargoRunner, manifest: &Path) -> Result<CargoRun, BuildError> {
    let color = if cargo.echo_progress && std::io::stderr().is_terminal() {
        "always"
    } else {
        "never"
    };
    let mut child = Command::new(&cargo.program)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .arg(format!("--color={color}"))
        .arg("--manifest-path")
        .arg(manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BuildError::CargoMissing {
            program: cargo.program.clone(),
            source,
        })?;

    // stderr: human progress and diagnostics, echoed as they come and kept.
    let stderr = child.stderr.take();
    let echo = cargo.echo_progress;
    let stderr_reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("{line}");
                }
                kept.push(strip_ansi(&line));
            }
        }
        kept
    });

    // stdout: one JSON message per line.
    let mut artifacts = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(artifact) = parse_artifact(&line) {
                artifacts.push(artifact);
            }
        }
    }
    let status = child.wait().map_err(|source| BuildError::CargoMissing {
        program: cargo.program.clone(),
        source,
    })?;
    let stderr = stderr_reader.join().unwrap_or_default();
    Ok(CargoRun {
        status,
        artifacts,
        stderr,
    })
}

/// The component in one line of cargo's JSON output, if it announces one.
fn parse_artifact(line: &str) -> Option<Artifact> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let target = msg.get("target")?;
    let is_cdylib = |key: &str| {
        target
            .get(key)
            .and_then(|v| v.as_array())
            .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("cdylib")))
    };
    if !is_cdylib("kind") && !is_cdylib("crate_types") {
        return None;
    }
    let wasm = msg
        .get("filenames")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))?;
    let manifest = PathBuf::from(msg.get("manifest_path")?.as_str()?);
    let package = msg
        .get("package_id")
        .and_then(|id| id.as_str())
        .and_then(package_name_from_id)
        .or_else(|| target.get("name")?.as_str().map(str::to_owned))?;
    Some(Artifact {
        package,
        manifest,
        wasm: PathBuf::from(wasm),
    })
}

/// The package name in a cargo package id: the spec form
/// `path+file:///dir/echo#0.1.0` (name = last path segment) or
/// `path+file:///dir/x#echo@0.1.0`, or the older `echo 0.1.0 (path+file:///dir/echo)`.
fn package_name_from_id(id: &str) -> Option<String> {
    if let Some((name, _)) = id.split_once(' ') {
        return (!name.is_empty()).then(|| name.to_owned());
    }
    let (url, fragment) = id.split_once('#')?;
    if let Some((name, _version)) = fragment.split_once('@') {
        return (!name.is_empty()).then(|| name.to_owned());
    }
    let url = url.split('?').next().unwrap_or(url);
    url.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The component built for `manifest`; failing that (a workspace manifest), the only
/// component built.
fn select_artifact<'a>(
    project: &Path,
    manifest: &Path,
    artifacts: &'a [Artifact],
) -> Result<&'a Artifact, BuildError> {
    let same_file =
        |a: &Path| a == manifest || std::fs::canonicalize(a).is_ok_and(|a| a == manifest);
    if let Some(own) = artifacts.iter().rev().find(|a| same_file(&a.manifest)) {
        return Ok(own);
    }
    match artifacts {
        [] => Err(BuildError::NoArtifact(project.to_owned())),
        [only] => Ok(only),
        several => {
            let mut names: Vec<String> = several.iter().map(|a| a.package.clone()).collect();
            names.sort();
            names.dedup();
            Err(BuildError::SeveralArtifacts {
                project: project.to_owned(),
                names,
            })
        }
    }
}

/// Where the component goes: `-o FILE` (`DIR/NAME.wasm` for an existing directory), or
/// by default `PROJECT/../NAME.wasm`.
fn output_path(
    project: &Path,
    output: Option<&Path>,
    package: &str,
) -> Result<PathBuf, BuildError> {
    let file_name = format!("{package}.wasm");
    if let Some(out) = output {
        return Ok(if out.is_dir() {
            out.join(file_name)
        } else {
            out.to_owned()
        });
    }
    // `plugins/echo` -> `plugins/echo.wasm`, lexically when the last component is a
    // plain name, so the path printed is the one the user typed.
    if let Some(Component::Normal(_)) = project.components().next_back()
        && let Some(parent) = project.parent()
    {
        return Ok(parent.join(file_name));
    }
    let abs = std::fs::canonicalize(project).map_err(|source| BuildError::Io {
        what: "could not resolve",
        path: project.to_owned(),
        source,
    })?;
    Ok(abs.parent().unwrap_or(&abs).join(file_name))
}

/// Copies `from` to `to` through a temporary file in the same directory (not ending
/// in `.wasm`, so a plugin watcher ignores it) and a rename.
fn copy_atomically(from: &Path, to: &Path) -> Result<(), BuildError> {
    let file_name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "persona.wasm".into());
    let tmp = to.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { what, path, source }
    };
    std::fs::copy(from, &tmp).map_err(io("could not write", to))?;
    std::fs::rename(&tmp, to).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        BuildError::Io {
            what: "could not write",
            path: to.to_owned(),
            source,
        }
    })
}

/// Turns a failed cargo run into the error that tells the user what to do.
fn classify_failure(project: &Path, status: ExitStatus, stderr: &[String]) -> BuildError {
    let target_missing = stderr.iter().any(|l| {
        l.contains("target may not be installed")
            || l.contains(&format!("rustup target add {TARGET}"))
            || (l.contains("can't find crate for `core`")
                || l.contains("can't find crate for `std`"))
            || (l.contains("could not find specification for target") && l.contains(TARGET))
    });
    if target_missing {
        return BuildError::TargetMissing;
    }
    let first_error = stderr
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("error"))
        .map(|l| l.chars().take(300).collect());
    BuildError::CompileFailed {
        project: project.to_owned(),
        status,
        first_error,
    }
}

/// `line` without ANSI escape sequences (cargo colours its output on a terminal).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32) -> ExitStatus {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            ExitStatus::from_raw(code << 8)
        }
        #[cfg(not(unix))]
        {
            use std::os::windows::process::ExitStatusExt;
            ExitStatus::from_raw(code as u32)
        }
    }

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name_from_id("path+file:///work/main/plugins/echo#0.1.0").as_deref(),
            Some("echo")
        );
        assert_eq!(
            package_name_from_id("path+file:///work/main/tests/guests/loop#guest-loop@0.1.0")
                .as_deref(),
            Some("guest-loop")
        );
        assert_eq!(
            package_name_from_id("echo 0.1.0 (path+file:///work/echo)").as_deref(),
            Some("echo")
        );
        assert_eq!(
            package_name_from_id("registry+https://example.invalid/index#serde@1.0.0").as_deref(),
            Some("serde")
        );
        assert_eq!(package_name_from_id("nonsense"), None);
    }

    #[test]
    fn parses_cdylib_artifacts_only() {
        let wasm = r#"{"reason":"compiler-artifact","package_id":"path+file:///p/echo#0.1.0","manifest_path":"/p/echo/Cargo.toml","target":{"kind":["cdylib"],"crate_types":["cdylib"],"name":"echo","src_path":"/p/echo/src/lib.rs"},"profile":{},"features":[],"filenames":["/p/target/wasm32-wasip2/release/echo.wasm"],"executable":null,"fresh":false}"#;
        assert_eq!(
            parse_artifact(wasm),
            Some(Artifact {
                package: "echo".into(),
                manifest: "/p/echo/Cargo.toml".into(),
                wasm: "/p/target/wasm32-wasip2/release/echo.wasm".into(),
            })
        );
        let rlib = r#"{"reason":"compiler-artifact","package_id":"path+file:///p/roost-guest#0.1.0","manifest_path":"/p/roost-guest/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"roost_guest"},"filenames":["/p/target/wasm32-wasip2/release/libroost_guest.rlib"]}"#;
        assert_eq!(parse_artifact(rlib), None);
        let native = r#"{"reason":"compiler-artifact","package_id":"path+file:///p/echo#0.1.0","manifest_path":"/p/echo/Cargo.toml","target":{"kind":["cdylib"],"name":"echo"},"filenames":["/p/target/release/libecho.so"]}"#;
        assert_eq!(parse_artifact(native), None);
        assert_eq!(
            parse_artifact(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(parse_artifact("not json"), None);
        assert_eq!(parse_artifact(""), None);
    }

    fn artifact(package: &str, manifest: &str) -> Artifact {
        Artifact {
            package: package.into(),
            manifest: manifest.into(),
            wasm: format!("/t/{package}.wasm").into(),
        }
    }

    #[test]
    fn selects_the_projects_own_artifact() {
        let all = [
            artifact("echo", "/p/echo/Cargo.toml"),
            artifact("greeter", "/p/greeter/Cargo.toml"),
        ];
        let got = select_artifact(
            Path::new("p/greeter"),
            Path::new("/p/greeter/Cargo.toml"),
            &all,
        )
        .unwrap();
        assert_eq!(got.package, "greeter");
        // A workspace manifest: no artifact of its own.
        let err = select_artifact(Path::new("p"), Path::new("/p/Cargo.toml"), &all).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p builds several personas (echo, greeter): build one of them"
        );
        let one = [artifact("echo", "/p/echo/Cargo.toml")];
        assert_eq!(
            select_artifact(Path::new("p"), Path::new("/p/Cargo.toml"), &one)
                .unwrap()
                .package,
            "echo"
        );
        let err =
            select_artifact(Path::new("p/lib"), Path::new("/p/lib/Cargo.toml"), &[]).unwrap_err();
        assert!(matches!(err, BuildError::NoArtifact(_)), "{err}");
    }

    #[test]
    fn default_output_is_next_to_the_project() {
        assert_eq!(
            output_path(Path::new("plugins/echo"), None, "echo").unwrap(),
            Path::new("plugins/echo.wasm")
        );
        assert_eq!(
            output_path(Path::new("plugins/echo/"), None, "echo").unwrap(),
            Path::new("plugins/echo.wasm")
        );
        assert_eq!(
            output_path(Path::new("echo"), None, "echo").unwrap(),
            Path::new("echo.wasm")
        );
        assert_eq!(
            output_path(Path::new("/a/b/my-bot"), None, "bot").unwrap(),
            Path::new("/a/b/bot.wasm")
        );
        let here = std::env::current_dir().unwrap();
        assert_eq!(
            output_path(Path::new("."), None, "x").unwrap(),
            here.parent().unwrap_or(&here).join("x.wasm")
        );
    }

    #[test]
    fn explicit_output() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            output_path(Path::new("p/echo"), Some(Path::new("out/e.wasm")), "echo").unwrap(),
            Path::new("out/e.wasm")
        );
        assert_eq!(
            output_path(Path::new("p/echo"), Some(dir.path()), "echo").unwrap(),
            dir.path().join("echo.wasm")
        );
    }

    #[test]
    fn detects_project_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            project_dir(&missing),
            Err(BuildError::NotFound(_))
        ));
        assert!(matches!(
            project_dir(dir.path()),
            Err(BuildError::NoCargoToml(_))
        ));

        std::fs::write(dir.path().join("app.py"), "print('hi')").unwrap();
        let err = project_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("Python personas are not supported yet"),
            "{err}"
        );

        std::fs::write(dir.path().join("Cargo.toml"), "[package]").unwrap();
        assert_eq!(project_dir(dir.path()).unwrap(), dir.path());
        assert_eq!(
            project_dir(&dir.path().join("Cargo.toml")).unwrap(),
            dir.path()
        );

        let file = dir.path().join("app.py");
        assert!(matches!(
            project_dir(&file),
            Err(BuildError::NoCargoToml(_))
        ));
    }

    #[test]
    fn classifies_failures() {
        let p = Path::new("plugins/echo");
        let missing_target: Vec<String> = [
            "   Compiling echo v0.1.0",
            "error[E0463]: can't find crate for `core`",
            "  = note: the `wasm32-wasip2` target may not be installed",
            "  = help: consider downloading the target with `rustup target add wasm32-wasip2`",
        ]
        .map(String::from)
        .to_vec();
        let err = classify_failure(p, status(101), &missing_target);
        assert_eq!(
            err.to_string(),
            "the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`"
        );

        let compile: Vec<String> = [
            "   Compiling echo v0.1.0 (/work/plugins/echo)",
            "error[E0425]: cannot find value `x` in this scope",
            " --> echo/src/lib.rs:3:5",
            "error: could not compile `echo` (lib) due to 1 previous error",
        ]
        .map(String::from)
        .to_vec();
        let err = classify_failure(p, status(101), &compile);
        assert_eq!(
            err.to_string(),
            "building plugins/echo failed (exit status: 101): error[E0425]: cannot find value `x` in this scope"
        );
        assert!(!err.to_string().contains('\n'));

        let err = classify_failure(p, status(101), &[]);
        assert_eq!(
            err.to_string(),
            "building plugins/echo failed (exit status: 101)"
        );
    }

    #[test]
    fn missing_cargo_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        let opts = BuildOptions {
            path: dir.path().to_owned(),
            output: None,
        };
        let cargo = CargoRunner {
            program: "/nonexistent/roost-test-cargo".into(),
            echo_progress: false,
        };
        let err = build_persona_with(&opts, &cargo).unwrap_err();
        assert!(matches!(err, BuildError::CargoMissing { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("could not run `/nonexistent/roost-test-cargo`"),
            "{err}"
        );
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(
            strip_ansi("\u{1b}[1m\u{1b}[91merror\u{1b}[0m\u{1b}[1m: boom\u{1b}[0m"),
            "error: boom"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn copies_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a.wasm");
        let to = dir.path().join("b.wasm");
        std::fs::write(&from, b"\0asm").unwrap();
        copy_atomically(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"\0asm");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        let err = copy_atomically(&from, &dir.path().join("missing/dir/c.wasm")).unwrap_err();
        assert!(err.to_string().starts_with("could not write"), "{err}");
    }
}
