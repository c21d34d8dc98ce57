//! `roost build PATH [-o FILE]`: build a persona project into a component.
//!
//! Two kinds of project are recognised by what PATH holds:
//!
//! - **Rust**: a cdylib crate (`Cargo.toml`; see `plugins/echo`). [`build_persona`] runs
//!
//!   ```text
//!   cargo build --release --target wasm32-wasip2 --message-format=json-render-diagnostics \
//!       --manifest-path PATH/Cargo.toml
//!   ```
//!
//!   passes cargo's human progress (and compiler errors) through to stderr, and finds the
//!   component cargo produced in its JSON artifact messages (so the crate may be
//!   standalone or a member of a workspace, with any target dir). NAME is the package
//!   name.
//! - **Python**: a `persona.toml` naming the persona (`name = "quizmaster"`, optionally
//!   `module = "app"` and `python_path = ["lib"]`) next to the module (`app.py`) whose
//!   class `WitWorld` implements the world. It is built with componentize-py
//!   ([`COMPONENTIZE_PY_VERSION`], from PyPI), which bundles CPython into the component:
//!
//!   ```text
//!   componentize-py -d WIT -w persona componentize -p PATH app -o NAME.wasm
//!   ```
//!
//!   against the contract's WIT files embedded in this binary ([`WIT_FILES`], written to
//!   a temporary folder), so an installed `roost` builds Python personas anywhere.
//!   Componentizing takes about 10 s; the start and the end are announced on stderr.
//!
//! The component is written to `FILE`, by default `PATH/../NAME.wasm`: `roost build
//! plugins/echo` writes `plugins/echo.wasm`, in the folder `roost run` watches. It is
//! written under a temporary name and renamed into place, so a watcher never sees a
//! half-written component.
//!
//! Every failure is one [`BuildError`] with a one-line message saying what to do:
//! missing project, neither `Cargo.toml` nor `persona.toml`, an unreadable
//! `persona.toml`, cargo or componentize-py not installed (with the install command),
//! the `wasm32-wasip2` target not installed, a compile error (cargo's diagnostics or
//! the Python traceback are printed above it), no cdylib artifact.
//!
//! ```no_run
//! use roost::build::{BuildOptions, build_persona};
//!
//! let opts = BuildOptions { path: "plugins/echo".into(), output: None };
//! let wasm = build_persona(&opts)?;
//! assert!(wasm.ends_with("echo.wasm"));
//! let opts = BuildOptions { path: "plugins/py-persona".into(), output: None };
//! let wasm = build_persona(&opts)?;
//! assert!(wasm.ends_with("quizmaster.wasm"));
//! # Ok::<(), roost::build::BuildError>(())
//! ```

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use crate::names::{BOT_NAME_MAX as NAME_MAX, BOT_NAME_MIN as NAME_MIN};

/// The target every persona is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// The componentize-py release roost is tested with (`pip install
/// componentize-py==0.25.1`; `.ci/run` installs the same). Another version is used
/// with a warning.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The manifest file that makes a folder a Python persona project.
pub const PYTHON_MANIFEST: &str = "persona.toml";

/// The world every persona targets.
pub const WORLD: &str = "persona";

/// The contract's WIT files (`wit/` of the repository), embedded so that an installed
/// `roost` can build Python personas and scaffold Rust ones anywhere.
pub const WIT_FILES: &[(&str, &str)] = &[
    ("config.wit", include_str!("../../wit/config.wit")),
    ("history.wit", include_str!("../../wit/history.wit")),
    ("kv.wit", include_str!("../../wit/kv.wit")),
    ("llm.wit", include_str!("../../wit/llm.wit")),
    ("log.wit", include_str!("../../wit/log.wit")),
    ("types.wit", include_str!("../../wit/types.wit")),
    ("world.wit", include_str!("../../wit/world.wit")),
];

/// Writes [`WIT_FILES`] into `dir` (created if needed).
pub fn write_wit(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in WIT_FILES {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// What `roost build` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The persona project: a directory with `Cargo.toml` or `persona.toml` (or that
    /// file itself).
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

/// How componentize-py is run for Python personas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonRunner {
    /// The componentize-py program: `componentize-py` from `PATH` by default.
    pub program: OsString,
    /// Whether to announce the (slow) step and print a failed build's traceback on
    /// stderr (it is kept either way, to explain a failure).
    pub echo_progress: bool,
}

impl Default for PythonRunner {
    fn default() -> Self {
        Self {
            program: "componentize-py".into(),
            echo_progress: true,
        }
    }
}

/// What kind of persona project a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectKind {
    /// A cargo crate (`Cargo.toml`).
    Rust,
    /// A Python app with a `persona.toml`.
    Python,
}

/// Why a name is not a valid persona name. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid persona name {name:?}: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

/// Words that cannot name a crate: Rust keywords (as the library name, `-` as `_`) and
/// the names of the built-in crates.
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
];

/// Checks a (normalised) persona name: 2-30 characters, lowercase ASCII letters,
/// digits, `-` and `_`, starting with a letter, and a valid crate name (not a Rust
/// keyword or a built-in crate). The same rule applies to `persona.toml`'s `name`.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let fail = |reason: String| {
        Err(NameError {
            name: name.to_owned(),
            reason,
        })
    };
    let n = name.chars().count();
    if !(NAME_MIN..=NAME_MAX).contains(&n) {
        return fail(format!(
            "a name is {NAME_MIN}-{NAME_MAX} characters (this one has {n})"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return fail("a name starts with a letter (a-z)".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return fail(format!(
            "{bad:?} is not allowed: use lowercase letters, digits, `-` and `_`"
        ));
    }
    let lib = name.replace('-', "_");
    if RESERVED.contains(&lib.as_str()) {
        return fail(format!(
            "`{name}` is a Rust keyword or a built-in crate's name"
        ));
    }
    Ok(())
}

/// `persona.toml`: what names a Python persona.
///
/// ```toml
/// name = "quizmaster"      # the component is written as NAME.wasm
/// module = "app"           # optional: the module whose class WitWorld is the persona
/// python_path = ["lib"]    # optional: more folders to import from (vendored packages)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonManifest {
    /// The persona's file name: 2-30 characters, lowercase letters, digits, `-`, `_`.
    pub name: String,
    /// The Python module holding the class `WitWorld` (default `app`).
    #[serde(default = "default_module")]
    pub module: String,
    /// Extra import folders, relative to the project.
    #[serde(default)]
    pub python_path: Vec<PathBuf>,
}

fn default_module() -> String {
    "app".into()
}

impl PythonManifest {
    /// Reads and checks `DIR/persona.toml`.
    pub fn load(dir: &Path) -> Result<Self, BuildError> {
        let path = dir.join(PYTHON_MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| BuildError::Io {
            what: "could not read",
            path: path.clone(),
            source,
        })?;
        let invalid = |reason: String| BuildError::InvalidManifest {
            path: path.clone(),
            reason,
        };
        let manifest: PythonManifest = toml::from_str(&text).map_err(|e| {
            invalid(
                e.message()
                    .lines()
                    .next()
                    .unwrap_or("not valid TOML")
                    .to_owned(),
            )
        })?;
        check_name(&manifest.name).map_err(|e| invalid(e.to_string()))?;
        let module_ok = !manifest.module.is_empty()
            && manifest.module.split('.').all(|part| {
                part.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            });
        if !module_ok {
            return Err(invalid(format!(
                "module {:?} is not a Python module name",
                manifest.module
            )));
        }
        if manifest.module.starts_with("wit_world")
            || manifest.module.starts_with("componentize_py")
        {
            return Err(invalid(format!(
                "module {:?} clashes with the modules componentize-py generates; rename it",
                manifest.module
            )));
        }
        Ok(manifest)
    }

    /// The folders Python imports from: the project, then `python_path`.
    fn import_dirs(&self, project: &Path) -> Vec<PathBuf> {
        std::iter::once(project.to_owned())
            .chain(self.python_path.iter().map(|p| project.join(p)))
            .collect()
    }

    /// Whether the module's source exists in one of the import folders.
    fn module_exists(&self, project: &Path) -> bool {
        let rel: PathBuf = self.module.split('.').collect();
        self.import_dirs(project).iter().any(|dir| {
            let base = dir.join(&rel);
            base.with_extension("py").is_file() || base.join("__init__.py").is_file()
        })
    }
}

/// Why a persona could not be built. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("persona project {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} is not a persona project: no Cargo.toml (a Rust cdylib crate) or persona.toml (a Python persona); `roost new NAME` creates one", .0.display())]
    NoCargoToml(PathBuf),
    #[error("{} has app.py but no persona.toml: a Python persona needs one naming it, e.g. `name = \"my-bot\"` (see `roost new NAME --lang python`)", .0.display())]
    NoPersonaToml(PathBuf),
    #[error("{}: {reason}", .path.display())]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("{} names module `{module}`, but there is no {}.py in {}", .project.join(PYTHON_MANIFEST).display(), .module.replace('.', "/"), .project.display())]
    NoPythonModule { project: PathBuf, module: String },
    #[error("could not run `{}` ({source}): install it with `pip install componentize-py=={COMPONENTIZE_PY_VERSION}`", .program.to_string_lossy())]
    ComponentizePyMissing {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("componentizing {} failed ({status}){}", .project.display(), first_error_suffix(.first_error))]
    PythonFailed {
        project: PathBuf,
        status: ExitStatus,
        /// The Python exception (or componentize-py's error), if one was printed.
        first_error: Option<String>,
    },
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
        /// That error's whole diagnostic (location, code, notes), a few lines.
        diagnostic: Vec<String>,
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

impl BuildError {
    /// The compiler's own account of a failed compile: its first diagnostic, a few
    /// lines (`error[E0425]: ...`, `--> src/lib.rs:12:5`, the code and notes);
    /// empty for every other failure.
    pub fn diagnostic(&self) -> &[String] {
        match self {
            BuildError::CompileFailed { diagnostic, .. } => diagnostic,
            _ => &[],
        }
    }
}

fn first_error_suffix(first: &Option<String>) -> String {
    first.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

/// Builds the persona project `opts.path` (Rust for [`TARGET`], or Python with
/// componentize-py) and writes the component to its output; returns the path written.
pub fn build_persona(opts: &BuildOptions) -> Result<PathBuf, BuildError> {
    build_persona_with(opts, &CargoRunner::default())
}

/// [`build_persona`] with an explicit cargo (a Python project uses the default
/// componentize-py, echoing progress as `cargo.echo_progress` says).
pub fn build_persona_with(opts: &BuildOptions, cargo: &CargoRunner) -> Result<PathBuf, BuildError> {
    let python = PythonRunner {
        echo_progress: cargo.echo_progress,
        ..PythonRunner::default()
    };
    build_persona_with_tools(opts, cargo, &python)
}

/// [`build_persona`] with an explicit cargo and componentize-py.
pub fn build_persona_with_tools(
    opts: &BuildOptions,
    cargo: &CargoRunner,
    python: &PythonRunner,
) -> Result<PathBuf, BuildError> {
    let (project, kind) = project_dir(&opts.path)?;
    match kind {
        ProjectKind::Rust => build_rust(&project, opts, cargo),
        ProjectKind::Python => build_python(&project, opts, python),
    }
}

/// Builds a Rust persona with cargo (see the module docs).
fn build_rust(
    project: &Path,
    opts: &BuildOptions,
    cargo: &CargoRunner,
) -> Result<PathBuf, BuildError> {
    let manifest = project.join("Cargo.toml");
    let manifest_abs = std::fs::canonicalize(&manifest).map_err(|source| BuildError::Io {
        what: "could not read",
        path: manifest.clone(),
        source,
    })?;
    tracing::debug!(project = %project.display(), "building persona");

    let run = run_cargo(cargo, &manifest)?;
    if !run.status.success() {
        return Err(classify_failure(project, run.status, &run.stderr));
    }
    let artifact = select_artifact(project, &manifest_abs, &run.artifacts)?;
    let output = output_path(project, opts.output.as_deref(), &artifact.package)?;
    copy_atomically(&artifact.wasm, &output)?;
    tracing::debug!(package = %artifact.package, output = %output.display(), "persona built");
    Ok(output)
}

/// The project directory named by `path` (the folder, or its `Cargo.toml` or
/// `persona.toml`) and what kind of project it is.
pub fn project_dir(path: &Path) -> Result<(PathBuf, ProjectKind), BuildError> {
    if !path.exists() {
        return Err(BuildError::NotFound(path.to_owned()));
    }
    let is_manifest = path
        .file_name()
        .is_some_and(|n| n == "Cargo.toml" || n == PYTHON_MANIFEST);
    let dir = if path.is_file() && is_manifest {
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
        Ok((dir, ProjectKind::Rust))
    } else if dir.join(PYTHON_MANIFEST).is_file() {
        Ok((dir, ProjectKind::Python))
    } else if dir.join("app.py").is_file() {
        Err(BuildError::NoPersonaToml(dir))
    } else {
        Err(BuildError::NoCargoToml(dir))
    }
}

/// Builds a Python persona with componentize-py (see the module docs).
fn build_python(
    project: &Path,
    opts: &BuildOptions,
    python: &PythonRunner,
) -> Result<PathBuf, BuildError> {
    let manifest = PythonManifest::load(project)?;
    if !manifest.module_exists(project) {
        return Err(BuildError::NoPythonModule {
            project: project.to_owned(),
            module: manifest.module.clone(),
        });
    }
    let output = output_path(project, opts.output.as_deref(), &manifest.name)?;
    let version = componentize_py_version(python)?;
    if version.as_deref() != Some(COMPONENTIZE_PY_VERSION) {
        tracing::warn!(
            found = version.as_deref().unwrap_or("unknown"),
            tested = COMPONENTIZE_PY_VERSION,
            "componentize-py version differs from the one roost is tested with"
        );
        if python.echo_progress {
            eprintln!(
                "warning: componentize-py {} found; roost is tested with {COMPONENTIZE_PY_VERSION} (`pip install componentize-py=={COMPONENTIZE_PY_VERSION}`)",
                version.as_deref().unwrap_or("(unknown version)")
            );
        }
    }

    let scratch = ScratchDir::new(&manifest.name).map_err(|source| BuildError::Io {
        what: "could not create a temporary folder in",
        path: std::env::temp_dir(),
        source,
    })?;
    let wit = scratch.path.join("wit");
    write_wit(&wit).map_err(|source| BuildError::Io {
        what: "could not write",
        path: wit.clone(),
        source,
    })?;
    let built = scratch.path.join(format!("{}.wasm", manifest.name));
    let abs_project = std::fs::canonicalize(project).map_err(|source| BuildError::Io {
        what: "could not resolve",
        path: project.to_owned(),
        source,
    })?;

    let mut cmd = Command::new(&python.program);
    cmd.arg("-q")
        .arg("-d")
        .arg(&wit)
        .args(["-w", WORLD, "componentize"]);
    let import_dirs = manifest.import_dirs(&abs_project);
    for dir in &import_dirs {
        cmd.arg("-p").arg(dir);
    }
    cmd.arg(&manifest.module)
        .arg("-o")
        .arg(&built)
        .current_dir(&abs_project)
        // componentize-py is a Rust program: no backtrace under the Python traceback.
        .env("RUST_BACKTRACE", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if python.echo_progress {
        eprintln!(
            "   Componentizing {} (Python, module `{}`) with componentize-py {}: bundling CPython takes about 10 s",
            project.display(),
            manifest.module,
            version.as_deref().unwrap_or("(unknown version)"),
        );
    }
    tracing::debug!(project = %project.display(), "componentizing Python persona");
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|source| BuildError::ComponentizePyMissing {
            program: python.program.clone(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        // componentize-py shows the i-th import folder as `/i/`: show the real paths.
        let mut report = python_report(&text);
        for (i, dir) in import_dirs.iter().enumerate() {
            report = report.replace(&format!("\"/{i}/"), &format!("\"{}/", dir.display()));
        }
        // The traceback; its summary (`Caused by: ...`) ends the error line below.
        let traceback = report
            .split("\nCaused by:")
            .next()
            .unwrap_or_default()
            .trim();
        if python.echo_progress && !traceback.is_empty() {
            eprintln!("{traceback}");
        }
        return Err(BuildError::PythonFailed {
            project: project.to_owned(),
            status: out.status,
            first_error: python_error_line(&text),
        });
    }
    if !built.is_file() {
        return Err(BuildError::PythonFailed {
            project: project.to_owned(),
            status: out.status,
            first_error: Some(format!("componentize-py wrote no {}", built.display())),
        });
    }
    copy_atomically(&built, &output)?;
    if python.echo_progress {
        eprintln!(
            "    Finished {} in {:.1} s",
            manifest.name,
            started.elapsed().as_secs_f64()
        );
    }
    tracing::debug!(name = %manifest.name, output = %output.display(), "persona built");
    Ok(output)
}

/// The version `componentize-py --version` prints (`componentize-py 0.25.1`); the
/// one-line install hint if it cannot be run.
fn componentize_py_version(python: &PythonRunner) -> Result<Option<String>, BuildError> {
    let out = Command::new(&python.program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BuildError::ComponentizePyMissing {
            program: python.program.clone(),
            source,
        })?;
    Ok(parse_version(&String::from_utf8_lossy(&out.stdout)))
}

/// `0.25.1` from `componentize-py 0.25.1`.
fn parse_version(text: &str) -> Option<String> {
    let word = text.split_whitespace().nth(1)?;
    word.chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        .then(|| word.to_owned())
}

/// What a failed componentize-py run printed, for a human: the Python traceback
/// without the wrapper around it (the `componentize-py` script's own frames and
/// a Rust backtrace, if any).
fn python_report(text: &str) -> String {
    let text = text.split("\nStack backtrace:").next().unwrap_or(text);
    let mut lines: Vec<&str> = text.lines().collect();
    // `Traceback ... sys.exit(script()) ... AssertionError: <the real error>`
    if let Some(i) = lines.iter().position(|l| l.starts_with("AssertionError: ")) {
        lines.drain(..i);
        lines[0] = lines[0].trim_start_matches("AssertionError: ");
    }
    lines.join("\n").trim().to_owned()
}

/// The one line that says what went wrong: the exception after `Caused by:` (e.g.
/// `SyntaxError: invalid syntax (app.py, line 3)`), else the last line of the
/// report.
fn python_error_line(text: &str) -> Option<String> {
    let report = python_report(text);
    let mut lines = report.lines().map(str::trim).filter(|l| !l.is_empty());
    let caused = report
        .lines()
        .skip_while(|l| l.trim() != "Caused by:")
        .skip(1)
        .map(str::trim)
        .find(|l| !l.is_empty());
    caused
        .or_else(|| lines.next_back())
        .map(|l| l.trim_start_matches("0: ").chars().take(300).collect())
}

/// A temporary folder removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new(label: &str) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "roost-build-{label}-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
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
    let color = if cargo.echo_progress && crate::os::colour(&std::io::stderr()) {
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
        diagnostic: first_diagnostic(stderr),
    }
}

/// The first diagnostic cargo rendered: from its `error` line to the blank line
/// that ends it, at most 16 lines of at most 300 characters.
fn first_diagnostic(stderr: &[String]) -> Vec<String> {
    stderr
        .iter()
        .skip_while(|l| !l.trim_start().starts_with("error"))
        .take_while(|l| !l.trim().is_empty())
        .take(16)
        .map(|l| l.trim_end().chars().take(300).collect())
        .collect()
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
        let err = project_dir(dir.path()).unwrap_err();
        assert!(matches!(err, BuildError::NoCargoToml(_)), "{err}");
        assert!(err.to_string().contains("no Cargo.toml"), "{err}");
        assert!(err.to_string().contains("persona.toml"), "{err}");

        std::fs::write(dir.path().join("app.py"), "print('hi')").unwrap();
        let err = project_dir(dir.path()).unwrap_err();
        assert!(matches!(err, BuildError::NoPersonaToml(_)), "{err}");
        assert!(err.to_string().contains("no persona.toml"), "{err}");

        std::fs::write(dir.path().join(PYTHON_MANIFEST), "name = \"x\"").unwrap();
        let python = (dir.path().to_owned(), ProjectKind::Python);
        assert_eq!(project_dir(dir.path()).unwrap(), python);
        assert_eq!(
            project_dir(&dir.path().join(PYTHON_MANIFEST)).unwrap(),
            python
        );

        std::fs::write(dir.path().join("Cargo.toml"), "[package]").unwrap();
        let rust = (dir.path().to_owned(), ProjectKind::Rust);
        assert_eq!(project_dir(dir.path()).unwrap(), rust);
        assert_eq!(project_dir(&dir.path().join("Cargo.toml")).unwrap(), rust);

        let file = dir.path().join("app.py");
        assert!(matches!(
            project_dir(&file),
            Err(BuildError::NoCargoToml(_))
        ));
    }

    fn manifest_in(text: &str) -> (tempfile::TempDir, Result<PythonManifest, BuildError>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PYTHON_MANIFEST), text).unwrap();
        let m = PythonManifest::load(dir.path());
        (dir, m)
    }

    #[test]
    fn reads_persona_toml() {
        let (_d, m) = manifest_in("name = \"quizmaster\"\n");
        let m = m.unwrap();
        assert_eq!(m.name, "quizmaster");
        assert_eq!(m.module, "app");
        assert!(m.python_path.is_empty());

        let (d, m) =
            manifest_in("name = \"q-bot\"\nmodule = \"bot.main\"\npython_path = [\"lib\"]\n");
        let m = m.unwrap();
        assert_eq!(m.module, "bot.main");
        assert_eq!(
            m.import_dirs(d.path()),
            [d.path().to_owned(), d.path().join("lib")]
        );
        assert!(!m.module_exists(d.path()));
        std::fs::create_dir_all(d.path().join("lib/bot")).unwrap();
        std::fs::write(d.path().join("lib/bot/main.py"), "").unwrap();
        assert!(m.module_exists(d.path()));

        let one_line = |text: &str| {
            let (_d, m) = manifest_in(text);
            let err = m.unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(PYTHON_MANIFEST), "{err}");
            err
        };
        assert!(one_line("").contains("missing field `name`"));
        assert!(one_line("name = \"x\"\nnmae = 1").contains("unknown field `nmae`"));
        assert!(one_line("name = ").contains(PYTHON_MANIFEST));
        assert!(one_line("name = \"Quiz Master\"").contains("invalid persona name"));
        assert!(
            one_line("name = \"qm\"\nmodule = \"my-app\"").contains("not a Python module name")
        );
        assert!(one_line("name = \"qm\"\nmodule = \"wit_world\"").contains("clashes"));
    }

    #[test]
    fn a_python_project_without_its_module_is_refused() {
        let (d, _) = manifest_in("name = \"qm\"\n");
        let opts = BuildOptions {
            path: d.path().to_owned(),
            output: None,
        };
        let err = build_persona_with(&opts, &CargoRunner::default()).unwrap_err();
        assert!(matches!(err, BuildError::NoPythonModule { .. }), "{err}");
        assert!(err.to_string().contains("no app.py in"), "{err}");
    }

    #[test]
    fn missing_componentize_py_is_one_clear_line() {
        let (d, _) = manifest_in("name = \"qm\"\n");
        std::fs::write(d.path().join("app.py"), "").unwrap();
        let opts = BuildOptions {
            path: d.path().to_owned(),
            output: None,
        };
        let python = PythonRunner {
            program: "/nonexistent/roost-test-componentize-py".into(),
            echo_progress: false,
        };
        let err = build_persona_with_tools(&opts, &CargoRunner::default(), &python).unwrap_err();
        assert!(
            matches!(err, BuildError::ComponentizePyMissing { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("could not run `/nonexistent/roost-test-componentize-py`"),
            "{msg}"
        );
        assert!(
            msg.ends_with(&format!(
                "install it with `pip install componentize-py=={COMPONENTIZE_PY_VERSION}`"
            )),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn python_failures_are_summarised() {
        let syntax = "Traceback (most recent call last):\n  File \"/root/.pyenv/versions/3.11.7/bin/componentize-py\", line 8, in <module>\n    sys.exit(script())\n             ^^^^^^^^\nAssertionError:   File \"/0/app.py\", line 1\n    def x(:\n          ^\nSyntaxError: invalid syntax\n\n\nCaused by:\n    SyntaxError: invalid syntax (app.py, line 1)\n\nStack backtrace:\n   0: <anyhow::Error>::msg\n";
        assert_eq!(
            python_error_line(syntax).as_deref(),
            Some("SyntaxError: invalid syntax (app.py, line 1)")
        );
        let report = python_report(syntax);
        assert!(report.starts_with("File \"/0/app.py\", line 1"), "{report}");
        assert!(!report.contains("sys.exit"), "{report}");
        assert!(!report.contains("backtrace"), "{report}");

        let other = "error: something odd\nreally odd\n";
        assert_eq!(python_error_line(other).as_deref(), Some("really odd"));
        assert_eq!(python_error_line(""), None);

        assert_eq!(
            parse_version("componentize-py 0.25.1\n").as_deref(),
            Some("0.25.1")
        );
        assert_eq!(parse_version("componentize-py\n"), None);
        assert_eq!(parse_version("something else entirely"), None);
    }

    #[test]
    fn embedded_wit_matches_the_repository() {
        let repo_wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(&repo_wit)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wit"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = WIT_FILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(on_disk, embedded, "add new wit/ files to WIT_FILES");
        for (name, text) in WIT_FILES {
            assert_eq!(
                std::fs::read_to_string(repo_wit.join(name)).unwrap(),
                *text,
                "{name}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        write_wit(&dir.path().join("wit")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("wit")).unwrap().count(),
            WIT_FILES.len()
        );
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

        let rendered: Vec<String> = [
            "   Compiling echo v0.1.0 (/work/plugins/echo)",
            "error[E0425]: cannot find value `x` in this scope",
            "  --> echo/src/lib.rs:3:5",
            "   |",
            "3  |     x",
            "   |     ^ not found in this scope",
            "",
            "error: could not compile `echo` (lib) due to 1 previous error",
        ]
        .map(String::from)
        .to_vec();
        let err = classify_failure(p, status(101), &rendered);
        assert_eq!(err.diagnostic(), &rendered[1..6]);

        let err = classify_failure(p, status(101), &[]);
        assert!(err.diagnostic().is_empty());
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
