//! `roost dev` with piped input: the binary itself, a folder of personas, a line
//! on standard input, the transcript on standard output.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guests::example;
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
