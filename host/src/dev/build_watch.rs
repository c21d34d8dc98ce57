//! The persona projects of a plugins folder: which there are, whether a project's
//! component is older than its source, and a watcher that rebuilds a project when
//! its source is saved.
//!
//! A project is a folder directly under the plugins folder: a Rust crate whose
//! `Cargo.toml` declares a `cdylib`, or a Python app with a `persona.toml`. It
//! builds to `DIR/NAME.wasm` ([`crate::build`]), which is the file hot reload
//! ([`crate::bot::reload`]) watches: so saving a source file rebuilds the component,
//! and the new component swaps into the running bot. A failed build writes nothing
//! (the build writes its output atomically, and only on success), so the running
//! version keeps answering.
//!
//! The watcher looks at the sources' modification times and sizes every
//! [`POLL`] rather than subscribing to file events: a project is a few dozen files,
//! and the folder also holds cargo's `target/`, which every build rewrites by the
//! thousand. A change is built once the source has stayed the same for one more
//! look (so an editor's save of several files is one build); a save during a build
//! is built after it. Builds run one at a time, on a thread of their own, and their
//! outcome arrives as a [`BuildEvent`]. This module prints nothing.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::build::{BuildError, BuildOptions, CargoRunner, PYTHON_MANIFEST, ProjectKind};

/// How often the watcher looks at the sources.
pub const POLL: Duration = Duration::from_millis(250);

/// A persona project in the plugins folder: `DIR/FOLDER/` builds to
/// `DIR/NAME.wasm`, NAME being the package name (Rust) or the `persona.toml` name
/// (Python), as `roost build` names it; for the examples FOLDER and NAME agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub name: String,
    pub dir: PathBuf,
    pub kind: ProjectKind,
    pub output: PathBuf,
}

impl Project {
    /// Whether the component is missing or older than a file of the source.
    pub fn is_stale(&self) -> bool {
        let Ok(built) = std::fs::metadata(&self.output).and_then(|m| m.modified()) else {
            return true;
        };
        newest_source(self).is_some_and(|src| src > built)
    }

    /// Why this project cannot be built here, if it cannot (a Python project
    /// without componentize-py).
    pub fn unbuildable(&self) -> Option<&'static str> {
        (self.kind == ProjectKind::Python && !on_path("componentize-py"))
            .then_some("Python personas need componentize-py (pip install componentize-py)")
    }

    /// Builds the project into its output (blocking: runs cargo or componentize-py,
    /// whose output is kept to explain a failure, not printed).
    pub fn build(&self) -> Result<PathBuf, BuildError> {
        let opts = BuildOptions {
            path: self.dir.clone(),
            output: Some(self.output.clone()),
        };
        let runner = CargoRunner {
            echo_progress: false,
            ..CargoRunner::default()
        };
        crate::build::build_persona_with(&opts, &runner)
    }

    /// A value that changes whenever a source file is added, removed, resized or
    /// modified.
    fn fingerprint(&self) -> u64 {
        let mut files = Vec::new();
        for root in source_roots(self) {
            list_sources(&root, &mut files);
        }
        files.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        files.hash(&mut h);
        h.finish()
    }
}

/// The persona projects directly under `plugins`, by name. Helper crates (no
/// `cdylib`), workspaces, `target/` and hidden folders are not projects.
pub fn find_projects(plugins: &Path) -> Vec<Project> {
    let Ok(entries) = std::fs::read_dir(plugins) else {
        return Vec::new();
    };
    let mut projects: Vec<Project> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|dir| {
            let folder = dir.file_name()?.to_str()?.to_owned();
            if folder.starts_with('.') || folder == "target" {
                return None;
            }
            let (kind, name) = if dir.join("Cargo.toml").is_file() {
                (ProjectKind::Rust, cdylib_package(&dir.join("Cargo.toml"))?)
            } else if dir.join(PYTHON_MANIFEST).is_file() {
                let name = crate::build::PythonManifest::load(&dir).map(|m| m.name);
                (ProjectKind::Python, name.unwrap_or(folder))
            } else {
                return None;
            };
            let output = plugins.join(format!("{name}.wasm"));
            Some(Project {
                name,
                dir,
                kind,
                output,
            })
        })
        .collect();
    projects.sort_by(|a, b| a.name.cmp(&b.name));
    projects
}

/// The package name of a `Cargo.toml` that declares `[lib] crate-type = [..., "cdylib", ...]`.
fn cdylib_package(manifest: &Path) -> Option<String> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let table = toml::from_str::<toml::Table>(&text).ok()?;
    let cdylib = table
        .get("lib")
        .and_then(|lib| lib.get("crate-type"))
        .and_then(|t| t.as_array())
        .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("cdylib")));
    let name = table.get("package")?.get("name")?.as_str()?;
    cdylib.then(|| name.to_string())
}

/// What a project builds from: a Rust crate's `Cargo.toml`, `build.rs`, `src/`
/// and `wit/` (a crate made by `roost new` carries its own copy of the contract);
/// every file of a Python project.
fn source_roots(project: &Project) -> Vec<PathBuf> {
    match project.kind {
        ProjectKind::Rust => ["Cargo.toml", "build.rs", "src", "wit"]
            .iter()
            .map(|p| project.dir.join(p))
            .collect(),
        ProjectKind::Python => vec![project.dir.clone()],
    }
}

/// The newest modification time of the files a project builds from.
fn newest_source(project: &Project) -> Option<SystemTime> {
    let mut files = Vec::new();
    for root in source_roots(project) {
        list_sources(&root, &mut files);
    }
    files.into_iter().filter_map(|f| f.modified).max()
}

/// One source file as the watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SourceFile {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

/// The files under `path` (or `path` itself), skipping hidden entries, build
/// output and Python caches.
fn list_sources(path: &Path, out: &mut Vec<SourceFile>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_file() {
        out.push(SourceFile {
            path: path.to_owned(),
            len: meta.len(),
            modified: meta.modified().ok(),
        });
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" || name == "__pycache__" {
            continue;
        }
        list_sources(&entry.path(), out);
    }
}

/// Whether `program` is an executable file on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

// ---------------------------------------------------------------------------
// Rebuild on save

/// What the watcher did.
#[derive(Debug)]
pub enum BuildEvent {
    /// A project's source changed (or a new project appeared): building.
    Started { name: String },
    /// Built; `changed` is false when the new component is byte for byte the old
    /// one (a comment edit), so no reload follows.
    Built {
        name: String,
        took: Duration,
        changed: bool,
    },
    /// The build failed; nothing was written, the running version keeps serving.
    Failed {
        name: String,
        took: Duration,
        error: BuildError,
    },
    /// A project that cannot be built here (said once per project).
    Skipped { name: String, why: &'static str },
}

/// A running watcher; stops when dropped (a build in progress finishes on its own
/// thread and still writes its component).
pub struct Rebuilds {
    pub events: mpsc::UnboundedReceiver<BuildEvent>,
    busy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Rebuilds {
    /// Whether a build is running or a change is waiting to be built.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
}

impl Drop for Rebuilds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches the projects under `plugins` and rebuilds one whenever its source
/// changes. Projects there now are taken as built (the start-up build dealt with
/// them); a project that appears later is built if its component is missing or
/// stale.
pub fn watch(plugins: PathBuf) -> Rebuilds {
    let (tx, events) = mpsc::unbounded_channel();
    let busy = Arc::new(AtomicBool::new(false));
    let known: HashMap<PathBuf, u64> = find_projects(&plugins)
        .iter()
        .map(|p| (p.dir.clone(), p.fingerprint()))
        .collect();
    let task = tokio::spawn(watch_loop(plugins, known, tx, busy.clone()));
    Rebuilds { events, busy, task }
}

async fn watch_loop(
    plugins: PathBuf,
    mut known: HashMap<PathBuf, u64>,
    tx: mpsc::UnboundedSender<BuildEvent>,
    busy: Arc<AtomicBool>,
) {
    // A change seen once, built when the next look finds the same fingerprint.
    let mut pending: HashMap<PathBuf, u64> = HashMap::new();
    let mut skipped: Vec<PathBuf> = Vec::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut due = Vec::new();
        for project in find_projects(&plugins) {
            let fp = project.fingerprint();
            let changed = match known.get(&project.dir) {
                Some(seen) => *seen != fp,
                // New since the start: build it unless its component is current.
                None => project.is_stale(),
            };
            if !changed {
                known.insert(project.dir.clone(), fp);
                pending.remove(&project.dir);
                continue;
            }
            if pending.get(&project.dir) == Some(&fp) {
                pending.remove(&project.dir);
                known.insert(project.dir.clone(), fp);
                due.push(project);
            } else {
                pending.insert(project.dir.clone(), fp);
            }
        }
        busy.store(!pending.is_empty() || !due.is_empty(), Ordering::SeqCst);
        for project in due {
            if let Some(why) = project.unbuildable() {
                if !skipped.contains(&project.dir) {
                    skipped.push(project.dir.clone());
                    let _ = tx.send(BuildEvent::Skipped {
                        name: project.name.clone(),
                        why,
                    });
                }
                continue;
            }
            let _ = tx.send(BuildEvent::Started {
                name: project.name.clone(),
            });
            let _ = tx.send(build_off_thread(project).await);
        }
        busy.store(!pending.is_empty(), Ordering::SeqCst);
    }
}

/// Builds on a thread of its own (not the runtime's blocking pool, which the
/// process would wait for at exit) and says how it went.
async fn build_off_thread(project: Project) -> BuildEvent {
    let (done, result) = oneshot::channel();
    let name = project.name.clone();
    let started = Instant::now();
    let spawned = std::thread::Builder::new()
        .name(format!("roost-dev-build-{name}"))
        .spawn(move || {
            let before = file_hash(&project.output);
            let built = project
                .build()
                .map(|_| file_hash(&project.output) != before);
            let _ = done.send(built);
        });
    let outcome = match spawned {
        Ok(_) => result.await.unwrap_or_else(|_| {
            Err(BuildError::Io {
                what: "the build thread ended early building",
                path: PathBuf::from(&name),
                source: std::io::Error::other("no result"),
            })
        }),
        Err(source) => Err(BuildError::Io {
            what: "could not start a build thread for",
            path: PathBuf::from(&name),
            source,
        }),
    };
    let took = started.elapsed();
    match outcome {
        Ok(changed) => BuildEvent::Built {
            name,
            took,
            changed,
        },
        Err(error) => BuildEvent::Failed { name, took, error },
    }
}

fn file_hash(path: &Path) -> Option<crate::plugin::cache::ContentHash> {
    std::fs::read(path)
        .ok()
        .map(|b| crate::plugin::cache::content_hash(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn finds_projects_and_their_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let cdylib = "[package]\nname = \"x\"\n[lib]\ncrate-type = [\"cdylib\"]\n";
        touch(
            &p.join("echo/Cargo.toml"),
            &cdylib.replace("\"x\"", "\"echo\""),
        );
        touch(&p.join("echo/src/lib.rs"), "");
        touch(
            &p.join("roost-guest/Cargo.toml"),
            "[package]\nname = \"roost-guest\"\n",
        );
        touch(&p.join("roost-guest/src/lib.rs"), "");
        touch(&p.join("py-persona/app.py"), "");
        touch(
            &p.join("py-persona/persona.toml"),
            "name = \"quizmaster\"\n",
        );
        touch(&p.join("target/x/Cargo.toml"), cdylib);
        touch(&p.join("notes/readme.md"), "");
        let found = find_projects(p);
        let names: Vec<(&str, ProjectKind)> =
            found.iter().map(|p| (p.name.as_str(), p.kind)).collect();
        assert_eq!(
            names,
            [
                ("echo", ProjectKind::Rust),
                ("quizmaster", ProjectKind::Python)
            ]
        );
        let echo = &found[0];
        assert_eq!(echo.output, p.join("echo.wasm"));
        assert!(echo.is_stale(), "no component yet");

        let old = SystemTime::now() - Duration::from_secs(3600);
        let older = old - Duration::from_secs(60);
        set_mtime(&p.join("echo/Cargo.toml"), older);
        set_mtime(&p.join("echo/src/lib.rs"), older);
        touch(&echo.output, "wasm");
        set_mtime(&echo.output, old);
        assert!(!echo.is_stale(), "newer than its source");
        touch(&p.join("echo/src/nested/mod.rs"), "");
        assert!(echo.is_stale(), "a source file changed after the build");
        set_mtime(&p.join("echo/src/nested/mod.rs"), older);
        touch(&p.join("echo/target/debug/junk"), "");
        touch(&p.join("echo/README.md"), "");
        assert!(!echo.is_stale(), "only the crate's sources count");
    }

    #[test]
    fn the_fingerprint_follows_every_source_change_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        touch(
            &p.join("echo/Cargo.toml"),
            "[package]\nname = \"echo\"\n[lib]\ncrate-type = [\"cdylib\"]\n",
        );
        touch(&p.join("echo/src/lib.rs"), "fn a() {}");
        let echo = find_projects(p).remove(0);
        let fp = echo.fingerprint();
        assert_eq!(fp, echo.fingerprint(), "stable while nothing changes");
        touch(&p.join("echo/target/release/x.wasm"), "build output");
        touch(&p.join("echo/.hidden.swp"), "editor swap file");
        touch(&p.join("echo/notes.md"), "not a source");
        assert_eq!(fp, echo.fingerprint(), "build output and notes don't count");
        touch(&p.join("echo/src/lib.rs"), "fn b() {}");
        let edited = echo.fingerprint();
        assert_ne!(fp, edited, "an edit");
        touch(&p.join("echo/src/more.rs"), "");
        let added = echo.fingerprint();
        assert_ne!(edited, added, "a new file");
        std::fs::remove_file(p.join("echo/src/more.rs")).unwrap();
        assert_ne!(added, echo.fingerprint(), "a removed file");
        touch(&p.join("echo/wit/world.wit"), "package a:b;");
        assert_ne!(edited, echo.fingerprint(), "the crate's own contract");
    }
}
