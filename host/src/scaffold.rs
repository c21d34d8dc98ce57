//! `roost new NAME [--lang rust|python]`: create a persona project that `roost build
//! NAME` turns into a working component without edits.
//!
//! - **Rust** (the default): a standalone `cdylib` crate, its own cargo workspace, with
//!   `wit-bindgen` as its only dependency and a copy of the contract in `wit/`, so it
//!   builds wherever it is created, with no path into this repository.
//! - **Python**: `app.py`, `persona.toml` and, when componentize-py is installed,
//!   `typings/` with the contract's types as Python for editors, type checkers and
//!   native unit tests (`componentize-py bindings`).
//!
//! Both come with a README telling the author what to change and a `.gitignore`.
//! NAME may be a path (`roost new plugins/my-bot`); its last component, lowercased,
//! is the persona's name: 2-30 characters, lowercase ASCII letters, digits, `-` and
//! `_`, starting with a letter, not a Rust keyword
//! ([`check_name`](crate::build::check_name)). An existing file or folder is never
//! touched. The project is written under a temporary name beside its final place and
//! renamed into place, so a failure leaves nothing behind.
//!
//! ```no_run
//! use roost::scaffold::{Lang, NewOptions, new_persona};
//!
//! let made = new_persona(&NewOptions { path: "pybot".into(), lang: Lang::Python })?;
//! assert_eq!(made.name, "pybot");
//! print!("{}", made.next_steps());
//! # Ok::<(), roost::scaffold::ScaffoldError>(())
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::build::{COMPONENTIZE_PY_VERSION, PythonRunner, WORLD, check_name, write_wit};

/// The wit-bindgen version the Rust template depends on (the one `roost-guest` uses).
pub const WIT_BINDGEN_VERSION: &str = "0.61";

/// The language of a new persona.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate built with cargo for wasm32-wasip2.
    #[default]
    Rust,
    /// A Python app built with componentize-py.
    Python,
}

/// What `roost new` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOptions {
    /// The folder to create; its last component names the persona.
    pub path: PathBuf,
    pub lang: Lang,
}

/// What `roost new` created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaffold {
    /// The project folder.
    pub dir: PathBuf,
    /// The persona's name (the component is written as `NAME.wasm`).
    pub name: String,
    pub lang: Lang,
    /// The files written, relative to `dir`, in order.
    pub files: Vec<PathBuf>,
    /// Things the author should know (e.g. type hints skipped), one line each.
    pub notes: Vec<String>,
}

impl Scaffold {
    /// What to do next, for the terminal.
    pub fn next_steps(&self) -> String {
        let dir = self.dir.display();
        let lang = match self.lang {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
        };
        let edit = match self.lang {
            Lang::Rust => "src/lib.rs",
            Lang::Python => "app.py",
        };
        let mut out = format!("created {lang} persona `{}` in {dir}/\n", self.name);
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        let parent = self.dir.parent().filter(|p| !p.as_os_str().is_empty());
        let wasm = format!("{}.wasm", self.name);
        let wasm = parent.map_or_else(|| PathBuf::from(&wasm), |p| p.join(&wasm));
        let parent = parent.unwrap_or(Path::new("."));
        out.push_str(&format!(
            "try it:\n  roost dev --plugins {}\n    builds it, runs it in a local chat room with you (say `@{} hi`),\n    and rebuilds it whenever you save a file\n",
            parent.display(),
            self.name
        ));
        out.push_str(&format!(
            "or build and check it:\n  roost build {dir}\n  roost check {}\nthen edit {dir}/{edit} (see {dir}/README.md)\n",
            wasm.display()
        ));
        out
    }
}

/// Why a project was not created. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("invalid persona name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("{} already exists: choose another name or remove it first", .0.display())]
    Exists(PathBuf),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The persona name for what the user typed: trimmed and lowercased.
pub fn normalise_name(raw: &str) -> String {
    raw.trim().to_ascii_lowercase()
}

/// Creates the project with the default componentize-py (for Python type hints).
pub fn new_persona(opts: &NewOptions) -> Result<Scaffold, ScaffoldError> {
    new_persona_with(opts, &PythonRunner::default())
}

/// [`new_persona`] with an explicit componentize-py.
pub fn new_persona_with(
    opts: &NewOptions,
    python: &PythonRunner,
) -> Result<Scaffold, ScaffoldError> {
    let dir = opts.path.clone();
    let typed = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = normalise_name(&typed);
    check_name(&name).map_err(|e| ScaffoldError::InvalidName {
        name: if typed.is_empty() {
            dir.display().to_string()
        } else {
            typed.clone()
        },
        reason: e.reason,
    })?;
    if dir.symlink_metadata().is_ok() {
        return Err(ScaffoldError::Exists(dir));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(ScaffoldError::Io {
            what: "cannot create the project in",
            path: parent,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }

    // Written beside the final place (same filesystem), then renamed into place.
    let staging = parent.join(format!(".{typed}.roost-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = write_project(&staging, &name, opts.lang, python);
    let (files, notes) = match result {
        Ok(made) => made,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(ScaffoldError::Exists(dir));
    }
    std::fs::rename(&staging, &dir).map_err(|source| {
        let _ = std::fs::remove_dir_all(&staging);
        ScaffoldError::Io {
            what: "could not create",
            path: dir.clone(),
            source,
        }
    })?;
    Ok(Scaffold {
        dir,
        name,
        lang: opts.lang,
        files,
        notes,
    })
}

type Written = (Vec<PathBuf>, Vec<String>);

fn write_project(
    root: &Path,
    name: &str,
    lang: Lang,
    python: &PythonRunner,
) -> Result<Written, ScaffoldError> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let mut put = |rel: &str, text: &str| -> Result<(), ScaffoldError> {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ScaffoldError::Io {
                what: "could not create",
                path: dir.to_owned(),
                source,
            })?;
        }
        std::fs::write(&path, fill(text, name)).map_err(|source| ScaffoldError::Io {
            what: "could not write",
            path: path.clone(),
            source,
        })?;
        files.push(PathBuf::from(rel));
        Ok(())
    };
    match lang {
        Lang::Rust => {
            put(
                "Cargo.toml",
                include_str!("../templates/rust/Cargo.toml.tmpl"),
            )?;
            put("src/lib.rs", include_str!("../templates/rust/src/lib.rs"))?;
            put("README.md", include_str!("../templates/rust/README.md"))?;
            put(".gitignore", include_str!("../templates/rust/gitignore"))?;
            for (file, text) in crate::build::WIT_FILES {
                put(&format!("wit/{file}"), text)?;
            }
        }
        Lang::Python => {
            put(
                "persona.toml",
                include_str!("../templates/python/persona.toml"),
            )?;
            put("app.py", include_str!("../templates/python/app.py"))?;
            put("README.md", include_str!("../templates/python/README.md"))?;
            put(".gitignore", include_str!("../templates/python/gitignore"))?;
            match python_typings(root, python) {
                Ok(()) => {
                    put(
                        "typings/componentize_py_types.py",
                        include_str!("../templates/python/componentize_py_types.py"),
                    )?;
                    files.push(PathBuf::from("typings/wit_world/"));
                }
                Err(why) => notes.push(format!(
                    "type hints (typings/) skipped: {why}; `roost build` needs componentize-py too: `pip install componentize-py=={COMPONENTIZE_PY_VERSION}`"
                )),
            }
        }
    }
    Ok((files, notes))
}

/// `componentize-py -d WIT -w persona bindings ROOT/typings`, with the contract
/// written to a temporary folder inside `root` (removed afterwards).
fn python_typings(root: &Path, python: &PythonRunner) -> Result<(), String> {
    let wit = root.join(".wit-for-typings");
    write_wit(&wit).map_err(|e| format!("could not write {}: {e}", wit.display()))?;
    let out = Command::new(&python.program)
        .arg("-q")
        .arg("-d")
        .arg(&wit)
        .args(["-w", WORLD, "bindings"])
        .arg(root.join("typings"))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&wit);
    let program = OsString::from(&python.program);
    match out {
        Err(e) => Err(format!(
            "could not run `{}` ({e})",
            program.to_string_lossy()
        )),
        Ok(o) if !o.status.success() => Err(format!(
            "`{} bindings` failed ({}): {}",
            program.to_string_lossy(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
        )),
        Ok(_) => Ok(()),
    }
}

/// The template `text` with its placeholders filled in.
fn fill(text: &str, name: &str) -> String {
    text.replace("{{name}}", name)
        .replace("{{lib_name}}", &name.replace('-', "_"))
        .replace("{{componentize_py_version}}", COMPONENTIZE_PY_VERSION)
        .replace("{{wit_bindgen_version}}", WIT_BINDGEN_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_python() -> PythonRunner {
        PythonRunner {
            program: "/nonexistent/roost-test-componentize-py".into(),
            echo_progress: false,
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "pybot",
            "my-bot",
            "bot_2",
            "ab",
            "quizmaster",
            &"a".repeat(30),
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        let reason = |n: &str| check_name(n).unwrap_err().to_string();
        assert!(reason("a").contains("2-30 characters"), "{}", reason("a"));
        assert!(reason(&"a".repeat(31)).contains("2-30 characters"));
        assert!(reason("2bot").contains("starts with a letter"));
        assert!(reason("-bot").contains("starts with a letter"));
        assert!(
            reason("my bot").contains("' ' is not allowed"),
            "{}",
            reason("my bot")
        );
        assert!(reason("bot.py").contains("'.' is not allowed"));
        assert!(reason("Bot").contains("starts with a letter"));
        assert!(reason("fn").contains("Rust keyword"));
        assert!(reason("self").contains("Rust keyword"));
        assert!(reason("proc-macro").contains("built-in crate"));
        assert!(reason("test").contains("built-in crate"));
        assert!(!reason("my bot").contains('\n'));
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(normalise_name(" PyBot "), "pybot");
        assert_eq!(normalise_name("My-Bot"), "my-bot");
    }

    #[test]
    fn templates_are_filled() {
        let t = fill(
            "{{name}} {{lib_name}} {{componentize_py_version}}",
            "my-bot",
        );
        assert_eq!(t, format!("my-bot my_bot {COMPONENTIZE_PY_VERSION}"));
        for text in [
            include_str!("../templates/rust/Cargo.toml.tmpl"),
            include_str!("../templates/rust/README.md"),
            include_str!("../templates/python/app.py"),
            include_str!("../templates/python/persona.toml"),
            include_str!("../templates/python/README.md"),
        ] {
            assert!(
                !fill(text, "x-bot").contains("{{"),
                "unfilled placeholder in {text}"
            );
        }
        let cargo: toml::Value = toml::from_str(&fill(
            include_str!("../templates/rust/Cargo.toml.tmpl"),
            "x-bot",
        ))
        .unwrap();
        assert_eq!(cargo["package"]["name"].as_str(), Some("x-bot"));
        assert_eq!(cargo["lib"]["crate-type"][0].as_str(), Some("cdylib"));
        assert!(cargo.get("workspace").is_some(), "standalone workspace");
    }

    #[test]
    fn wit_bindgen_matches_roost_guest() {
        let guest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/roost-guest/Cargo.toml"),
        )
        .unwrap();
        let guest: toml::Value = toml::from_str(&guest).unwrap();
        assert_eq!(
            guest["dependencies"]["wit-bindgen"]["version"].as_str(),
            Some(WIT_BINDGEN_VERSION),
            "keep the Rust template on roost-guest's wit-bindgen"
        );
    }

    #[test]
    fn creates_a_rust_project() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("My-Bot");
        let made = new_persona_with(
            &NewOptions {
                path: dir.clone(),
                lang: Lang::Rust,
            },
            &no_python(),
        )
        .unwrap();
        assert_eq!(made.name, "my-bot");
        assert_eq!(made.dir, dir);
        assert!(made.notes.is_empty());
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"my-bot\""), "{cargo}");
        assert!(dir.join("src/lib.rs").is_file());
        assert!(dir.join(".gitignore").is_file());
        for (file, text) in crate::build::WIT_FILES {
            assert_eq!(
                std::fs::read_to_string(dir.join("wit").join(file)).unwrap(),
                *text
            );
        }
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.starts_with("# my-bot\n"), "{readme}");
        assert!(
            made.next_steps().contains("roost build "),
            "{}",
            made.next_steps()
        );
        let steps = made.next_steps();
        let try_it = format!("roost dev --plugins {}\n", tmp.path().display());
        assert!(steps.contains(&try_it), "{steps}");
        assert!(steps.contains("`@my-bot hi`"), "{steps}");
        let here = Scaffold {
            dir: PathBuf::from("mybot"),
            ..made
        };
        assert!(here.next_steps().contains("roost dev --plugins .\n"));
        assert!(here.next_steps().contains("roost check my-bot.wasm\n"));
        // Nothing else left beside it.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["My-Bot"]);
    }

    #[test]
    fn creates_a_python_project_without_componentize_py() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pybot");
        let made = new_persona_with(
            &NewOptions {
                path: dir.clone(),
                lang: Lang::Python,
            },
            &no_python(),
        )
        .unwrap();
        assert_eq!(made.name, "pybot");
        let toml = std::fs::read_to_string(dir.join("persona.toml")).unwrap();
        assert!(toml.contains("name = \"pybot\""), "{toml}");
        let app = std::fs::read_to_string(dir.join("app.py")).unwrap();
        assert!(app.contains("name=\"pybot\""), "{app}");
        assert!(app.contains("class WitWorld(wit_world.WitWorld)"));
        // No componentize-py: a note instead of typings, and no leftovers.
        assert_eq!(made.notes.len(), 1);
        assert!(
            made.notes[0].contains("pip install componentize-py=="),
            "{:?}",
            made.notes
        );
        assert!(!dir.join("typings").exists());
        assert!(!dir.join(".wit-for-typings").exists());
        assert!(made.next_steps().contains("note: type hints"));
        // What roost build reads is valid.
        let manifest = crate::build::PythonManifest::load(&dir).unwrap();
        assert_eq!(manifest.name, "pybot");
        assert_eq!(manifest.module, "app");
    }

    #[test]
    fn refuses_existing_paths_and_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("taken");
        std::fs::create_dir(&dir).unwrap();
        let err = new_persona_with(
            &NewOptions {
                path: dir.clone(),
                lang: Lang::Rust,
            },
            &no_python(),
        )
        .unwrap_err();
        assert!(matches!(err, ScaffoldError::Exists(_)), "{err}");
        assert!(
            err.to_string()
                .ends_with("already exists: choose another name or remove it first")
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "left untouched"
        );

        let file = tmp.path().join("file-bot");
        std::fs::write(&file, "x").unwrap();
        let err = new_persona_with(
            &NewOptions {
                path: file,
                lang: Lang::Python,
            },
            &no_python(),
        )
        .unwrap_err();
        assert!(matches!(err, ScaffoldError::Exists(_)), "{err}");

        let err = new_persona_with(
            &NewOptions {
                path: tmp.path().join("no way"),
                lang: Lang::Rust,
            },
            &no_python(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid persona name \"no way\": ' ' is not allowed: use lowercase letters, digits, `-` and `_`"
        );
        assert!(!tmp.path().join("no way").exists());

        let err = new_persona_with(
            &NewOptions {
                path: tmp.path().join("missing/parent/bot"),
                lang: Lang::Rust,
            },
            &no_python(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot create the project in"),
            "{err}"
        );
    }
}
