//! `roost dev` with piped input: the binary itself, a folder of personas, a line
//! on standard input, the transcript on standard output; and rebuild on save: a
//! copy of the `echo` example's source edited while `roost dev` runs.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guests::{example, repo_root};
use crate::support::{install, plugins};

/// The longest a `roost dev` run may take before the test kills it and fails.
const LIMIT: Duration = Duration::from_secs(60);

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `roost dev --plugins DIR` in `cwd` with `input` piped in; kills it and
/// fails the test if it has not exited by itself within [`LIMIT`].
fn run_dev(cwd: &Path, plugins: &Path, input: &str) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("dev")
        .arg("--plugins")
        .arg(plugins)
        .args(["--no-build", "--quiet-secs", "2", "--max-wait-secs", "30"])
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        // The shared compile cache goes under the test's folder, not ~/.cache.
        .env("XDG_CACHE_HOME", cwd.join("cache"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roost dev");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "roost dev did not exit within {LIMIT:?}\nstdout:\n{}\nstderr:\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        success: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        took: started.elapsed(),
    }
}

/// The plugins folder in `dir`, holding `echo`.
fn plugins_with_echo(dir: &Path) -> std::path::PathBuf {
    install(dir, &example("echo"), "echo");
    plugins(dir)
}

#[test]
fn piped_input_is_echoed_back_and_dev_exits_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = plugins_with_echo(dir.path());
    let run = run_dev(dir.path(), &plugins, "@echo hello from the test\n");
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.success, "roost dev failed\n{context}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "#lobby you: @echo hello from the test"),
        "the human's line is in the transcript\n{context}"
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "#lobby echo: hello from the test"),
        "echo's reply is in the transcript\n{context}"
    );
    assert!(
        !run.stdout.contains('\x1b'),
        "no colours with NO_COLOR\n{context}"
    );
    assert!(run.took < LIMIT, "took {:?}", run.took);
}

#[test]
fn a_broken_persona_is_one_line_and_the_others_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = plugins_with_echo(dir.path());
    std::fs::write(
        plugins.join("broken.wasm"),
        b"\0asm this is not a component",
    )
    .expect("write");
    let run = run_dev(dir.path(), &plugins, "hi all\n@echo still here\n");
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.success, "roost dev failed\n{context}");
    let about_broken: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("broken"))
        .collect();
    assert_eq!(
        about_broken.len(),
        1,
        "one line about the broken persona\n{context}"
    );
    assert!(
        run.stdout.lines().any(|l| l == "#lobby echo: still here"),
        "echo still answers\n{context}"
    );
    assert!(
        !run.stdout.contains("broken"),
        "errors stay off the transcript\n{context}"
    );
}

// ---------------------------------------------------------------------------
// Rebuild on save

/// The longest a rebuild test may take: its first run compiles the guest
/// bindings' dependencies (cached for the next runs).
const REBUILD_LIMIT: Duration = Duration::from_secs(400);

/// A `roost dev` still running: lines go in, stdout and stderr are collected.
struct Live {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl Live {
    /// `roost dev --plugins DIR` in `cwd`, building (and rebuilding) persona
    /// projects with cargo's output in `target_dir`.
    fn start(cwd: &Path, plugins: &Path, target_dir: &Path) -> Live {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roost"))
            .arg("dev")
            .arg("--plugins")
            .arg(plugins)
            .args(["--quiet-secs", "2", "--max-wait-secs", "60"])
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .env("XDG_CACHE_HOME", cwd.join("cache"))
            .env("CARGO_TARGET_DIR", target_dir)
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("RUST_LOG")
            .env_remove("ROOST_DEV_QUIET_PERSONAS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start roost dev");
        let collect = |r: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
        Live {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    fn context(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits until a line of stdout (`err` false) or stderr satisfies `pred`.
    fn wait_line(&mut self, err: bool, what: &str, pred: impl Fn(&str) -> bool) {
        loop {
            let text = if err { &self.stderr } else { &self.stdout };
            if text.lock().unwrap().lines().any(&pred) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "roost dev exited ({status}) before {what}\n{}",
                    self.context()
                );
            }
            if self.started.elapsed() > REBUILD_LIMIT {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the input and waits for `roost dev` to exit by itself.
    fn finish(mut self) -> (bool, String, String) {
        drop(self.stdin.take());
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if self.started.elapsed() > REBUILD_LIMIT {
                let _ = self.child.kill();
                panic!("roost dev did not exit\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The readers end with the pipes.
        std::thread::sleep(Duration::from_millis(100));
        let out = self.stdout.lock().unwrap().clone();
        let err = self.stderr.lock().unwrap().clone();
        (status.success(), out, err)
    }
}

/// A plugins folder in `dir` holding a copy of the `echo` example's source as
/// package `package` (its own cargo workspace, using the repository's
/// `roost-guest` and lockfile) and, newer than that source, the example's built
/// component as `package.wasm`: `roost dev` starts it without building. Returns
/// the folder and the copy's `src/lib.rs`.
fn echo_project(dir: &Path, package: &str) -> (PathBuf, PathBuf) {
    let repo = repo_root().join("plugins");
    let plugins = plugins(dir);
    let project = plugins.join(package);
    std::fs::create_dir_all(project.join("src")).expect("mkdir");
    let manifest = std::fs::read_to_string(repo.join("echo/Cargo.toml"))
        .expect("echo's Cargo.toml")
        .replacen("name = \"echo\"", &format!("name = \"{package}\""), 1);
    std::fs::write(project.join("Cargo.toml"), manifest).expect("write");
    let lib = project.join("src/lib.rs");
    std::fs::copy(repo.join("echo/src/lib.rs"), &lib).expect("copy lib.rs");
    let workspace = format!(
        "[workspace]\nresolver = \"3\"\nmembers = [\"{package}\"]\n\n\
         [workspace.package]\nedition = \"2024\"\nrust-version = \"1.95\"\n\
         license = \"Apache-2.0\"\npublish = false\n\n\
         [workspace.dependencies]\nroost-guest = {{ path = {:?} }}\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\n\
         strip = true\npanic = \"abort\"\n",
        repo.join("roost-guest").display().to_string()
    );
    std::fs::write(plugins.join("Cargo.toml"), workspace).expect("write workspace");
    std::fs::copy(repo.join("Cargo.lock"), plugins.join("Cargo.lock")).expect("copy lock");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(example("echo"), plugins.join(format!("{package}.wasm"))).expect("copy wasm");
    (plugins, lib)
}

/// Where the rebuild tests' cargo builds go: kept between runs, so only the first
/// compiles the guest bindings.
fn rebuild_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dev-rebuild")
}

/// Rewrites `path` with `from` replaced by `to` (which must change it).
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read source");
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write source");
}

/// The line of echo's source that makes its answer.
const ECHO_REPLY: &str = "(!rest.is_empty()).then(|| say(msg.room.clone(), rest))";

#[test]
fn saving_a_persona_source_swaps_the_running_bot_to_the_new_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugins, lib) = echo_project(dir.path(), "echo");
    let mut dev = Live::start(dir.path(), &plugins, &rebuild_target_dir());
    dev.say("@echo before the edit");
    dev.wait_line(false, "the first answer", |l| {
        l == "#lobby echo: before the edit"
    });

    // Save a new behaviour, with a log line of its own.
    edit(
        &lib,
        ECHO_REPLY,
        "{ roost_guest::info!(\"answering {}\", msg.sender); \
         (!rest.is_empty()).then(|| say(msg.room.clone(), format!(\"v2 {rest}\"))) }",
    );
    dev.wait_line(true, "the rebuild", |l| {
        l == "echo: source changed, rebuilding…"
    });
    dev.wait_line(true, "the swap", |l| {
        l == "hot reload: echo swapped to its new version 0.1.0"
    });
    dev.say("@echo after the edit");
    dev.wait_line(false, "the new answer", |l| {
        l == "#lobby echo: v2 after the edit"
    });
    // The persona's own log line, prefixed with the persona, off the transcript.
    dev.wait_line(true, "the persona's log line", |l| {
        l == "[echo] answering you"
    });

    let (ok, out, err) = dev.finish();
    let context = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "roost dev failed\n{context}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("echo: built in ") && l.ends_with(" s, swapping it in")),
        "{context}"
    );
    assert!(
        err.contains("saving a persona's source rebuilds it and swaps it in live"),
        "the banner says so\n{context}"
    );
    let real = std::fs::canonicalize(&plugins).expect("canonical");
    assert!(
        err.contains(&format!("personas from {}", real.display())),
        "the banner names the real folder\n{context}"
    );
    assert!(
        !out.contains("[echo]"),
        "logs stay off the transcript\n{context}"
    );
}

#[test]
fn a_broken_save_shows_the_build_error_and_the_old_version_keeps_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Its own package name: the two rebuild tests share cargo's target folder.
    let (plugins, lib) = echo_project(dir.path(), "echo-b");
    let mut dev = Live::start(dir.path(), &plugins, &rebuild_target_dir());
    dev.say("@echo before the edit");
    dev.wait_line(false, "the first answer", |l| {
        l == "#lobby echo: before the edit"
    });

    edit(
        &lib,
        ECHO_REPLY,
        "{ let broken: u32 = \"not a number\"; (!rest.is_empty()).then(|| say(msg.room.clone(), rest)) }",
    );
    dev.wait_line(true, "the failed build", |l| {
        l.starts_with("echo-b: build failed after ")
            && l.ends_with("; the running version keeps answering")
    });
    dev.wait_line(true, "the compiler's error", |l| {
        l.starts_with("  error[E0308]: mismatched types")
    });
    dev.wait_line(true, "where it is", |l| {
        l.trim_start().starts_with("--> ") && l.contains("src/lib.rs:")
    });
    dev.say("@echo after the broken edit");
    dev.wait_line(false, "the old version's answer", |l| {
        l == "#lobby echo: after the broken edit"
    });

    let (ok, out, err) = dev.finish();
    let context = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "roost dev failed\n{context}");
    assert!(!err.contains("swapped"), "nothing was swapped\n{context}");
    assert!(
        !out.contains("error"),
        "errors stay off the transcript\n{context}"
    );
}
