//! The command line on bad input: one line on stderr, a non-zero exit, never a panic.

use std::process::{Command, Output};

fn roost(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run roost")
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn config_errors_are_one_line_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[server]\nurl = \"http://127.0.0.1:9\"\n\n[personas.echo]\ncolour = \"red\"\n",
    )
    .expect("write");
    let e = one_line_error(&roost(
        &["run", "--config", "bad.toml", "--print-config"],
        dir.path(),
    ));
    assert!(
        e.contains("bad.toml:5") && e.contains("unknown key `colour`"),
        "{e}"
    );

    std::fs::write(&cfg, "[session]\nping_interval_ms = 0\n").expect("write");
    let e = one_line_error(&roost(&["run", "--config", "bad.toml"], dir.path()));
    assert!(
        e.contains("session.ping_interval_ms must be above zero"),
        "{e}"
    );

    std::fs::write(&cfg, "[personas.x.settings]\nkey = \"sk-ant-api03-eCtA03aZxrTUWm6MbGHV5tCdnmv8nIoyqcE0JwQBttlMOd_OFOkXMsB1j-68akAOmEXdaT_y0UrynTy9URoVAusyxMtMPAA\"\n")
        .expect("write");
    let e = one_line_error(&roost(&["run", "--config", "bad.toml"], dir.path()));
    assert!(
        e.contains("looks like a credential") && !e.contains("sk-ant-api03"),
        "{e}"
    );

    std::fs::write(&cfg, "this is [not toml").expect("write");
    one_line_error(&roost(&["run", "--config", "bad.toml"], dir.path()));
    let e = one_line_error(&roost(&["run", "--config", "missing.toml"], dir.path()));
    assert!(e.contains("missing.toml"), "{e}");
    let e = one_line_error(&roost(
        &["run", "--server", "ftp://nowhere", "--print-config"],
        dir.path(),
    ));
    assert!(e.contains("server.url"), "{e}");
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = roost(
        &[
            "run",
            "--print-config",
            "--server",
            "http://127.0.0.1:9",
            "--state",
            "/tmp/roost-x",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = roost::config::Config::parse(&text, "printed").expect("prints valid TOML");
    assert_eq!(parsed.server.url, "http://127.0.0.1:9");
    assert_eq!(parsed.paths.state, std::path::PathBuf::from("/tmp/roost-x"));
}

#[test]
fn run_without_a_plugins_folder_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = one_line_error(&roost(
        &[
            "run",
            "--server",
            "http://127.0.0.1:9",
            "--plugins",
            "nowhere",
            "--state",
            "st",
        ],
        dir.path(),
    ));
    assert!(e.contains("nowhere"), "{e}");
}

// ---------------------------------------------------------------------------------------
// environment variables, colour, JSON errors

/// The subcommands `roost --help` lists (but `help`).
fn subcommands() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("--help")
        .output()
        .expect("run roost");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Each option of `--help` output (from its `-x, --flag` line to the next option or
/// section): (the flag, its whole text).
fn options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            in_options = line.starts_with("Options:");
            continue;
        }
        if !in_options {
            continue;
        }
        let t = line.trim_start();
        if t.starts_with('-') && line.len() - t.len() <= 6 {
            let flag = t
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or(t)
                .trim_end_matches(',')
                .to_string();
            out.push((flag, line.to_string()));
        } else if let Some(last) = out.last_mut() {
            last.1.push('\n');
            last.1.push_str(line);
        }
    }
    out
}

#[test]
fn help_names_an_environment_variable_for_every_flag() {
    let subs = subcommands();
    for want in ["dev", "run", "replay", "serve", "build", "new", "check"] {
        assert!(subs.iter().any(|s| s == want), "{want} not in {subs:?}");
    }
    for sub in &subs {
        let out = Command::new(env!("CARGO_BIN_EXE_roost"))
            .args([sub, "--help"])
            .env_remove("ROOST_CONFIG")
            .output()
            .expect("run roost");
        let help = String::from_utf8_lossy(&out.stdout);
        let opts = options(&help);
        assert!(opts.len() >= 3, "{sub}: too few options found in\n{help}");
        for (flag, text) in opts {
            if flag == "--help" || flag == "--version" {
                continue;
            }
            assert!(
                text.contains("[env: ROOST_"),
                "roost {sub} {flag} has no ROOST_* variable:\n{text}"
            );
        }
    }
}

#[test]
fn environment_variables_stand_in_for_flags_and_flags_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("from-env.toml"),
        "[session]\nping_interval_ms = 7000\n",
    )
    .expect("write");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_roost"))
            .arg("run")
            .args(extra)
            .current_dir(dir.path())
            .env("ROOST_CONFIG", "from-env.toml")
            .env("ROOST_SERVER", "http://127.0.0.1:9")
            .env("ROOST_PLUGINS", "/srv/personas")
            .env("ROOST_STATE", "/tmp/roost-env-state")
            .env("ROOST_METRICS", "127.0.0.1:9191")
            .env("ROOST_PRINT_CONFIG", "1")
            .env("ROOST_LOG_FORMAT", "json")
            .output()
            .expect("run roost");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        roost::config::Config::parse(&String::from_utf8_lossy(&out.stdout), "printed")
            .expect("prints valid TOML")
    };
    let c = run(&[]);
    assert_eq!(c.session.ping_interval_ms, 7000, "ROOST_CONFIG was read");
    assert_eq!(c.server.url, "http://127.0.0.1:9");
    assert_eq!(c.paths.plugins, std::path::PathBuf::from("/srv/personas"));
    assert_eq!(
        c.paths.state,
        std::path::PathBuf::from("/tmp/roost-env-state")
    );
    assert_eq!(c.telemetry.metrics, Some("127.0.0.1:9191".parse().unwrap()));
    let c = run(&["--server", "http://127.0.0.1:10", "--state", "st"]);
    assert_eq!(c.server.url, "http://127.0.0.1:10", "the flag wins");
    assert_eq!(c.paths.state, std::path::PathBuf::from("st"));
}

/// A pseudo-terminal: (master, slave). The child writes to the slave; we read the master.
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on a descriptor we own; ptsname's buffer is copied
    // before any other call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
        let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            slave >= 0,
            "open {name:?}: {}",
            std::io::Error::last_os_error()
        );
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// What `roost -v check MISSING` writes to stderr (a debug log line, then the error),
/// with stderr a terminal or a pipe, and NO_COLOR set or not.
fn stderr_of_a_logging_command(terminal: bool, no_color: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roost"));
    cmd.args(["-v", "check", "missing.wasm"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("ROOST_LOG_FORMAT")
        .env_remove("ROOST_VERBOSE");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    if !terminal {
        let out = cmd.output().expect("run roost");
        return String::from_utf8_lossy(&out.stderr).to_string();
    }
    use std::io::Read;
    let (mut master, slave) = pty();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(slave)
        .spawn()
        .expect("run roost");
    drop(cmd); // closes our copy of the slave, so reading ends when roost exits
    child.wait().expect("wait");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break, // EIO once no one holds the slave
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&bytes).to_string()
}

#[test]
fn logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let tty = stderr_of_a_logging_command(true, None);
    assert!(tty.contains("open-files limit"), "{tty:?}");
    assert!(tty.contains("\u{1b}["), "a terminal gets colour: {tty:?}");
    for (terminal, no_color) in [(true, Some("1")), (false, None), (false, Some("1"))] {
        let text = stderr_of_a_logging_command(terminal, no_color);
        assert!(text.contains("open-files limit"), "{text:?}");
        assert!(
            !text.contains('\u{1b}'),
            "terminal {terminal}, NO_COLOR {no_color:?}: {text:?}"
        );
    }
    // An empty NO_COLOR means unset (no-color.org).
    let text = stderr_of_a_logging_command(true, Some(""));
    assert!(text.contains("\u{1b}["), "{text:?}");
}

/// Runs roost in `dir` and returns its stdout as the one JSON error object it must be.
fn json_error(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .current_dir(dir)
        .env_remove("ROOST_JSON")
        .output()
        .expect("run roost");
    assert!(!out.status.success(), "{args:?} should fail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim_end().lines().count(), 1, "one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
    let e = v["error"].as_str().expect("an error string").to_string();
    assert!(!e.is_empty() && !e.contains('\n'), "{v}");
    e
}

#[test]
fn with_json_errors_are_json_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("garbage.wasm"), b"not wasm").expect("write");
    std::fs::write(d.join("log.jsonl"), "{}\n").expect("write");
    let e = json_error(&["check", "--json", "missing.wasm"], d);
    assert!(e.contains("missing.wasm"), "{e}");
    json_error(&["check", "garbage.wasm", "--json"], d);
    let e = json_error(
        &["check", "--json", "--config", "nope.toml", "garbage.wasm"],
        d,
    );
    assert!(e.contains("nope.toml"), "{e}");
    let e = json_error(
        &["replay", "--json", "--plugin", "missing.wasm", "log.jsonl"],
        d,
    );
    assert!(e.contains("missing.wasm"), "{e}");
    // Usage errors too, before the command line is understood.
    json_error(&["check", "--json"], d);
    json_error(&["replay", "--json", "--no-such-flag"], d);
    // ROOST_JSON=1 asks for JSON like --json.
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(["check", "missing.wasm"])
        .current_dir(d)
        .env("ROOST_JSON", "1")
        .output()
        .expect("run roost");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["error"].is_string(), "{v}");
    // Without --json, still one line on stderr.
    one_line_error(&roost(&["check", "missing.wasm"], d));
}

// ---------------------------------------------------------------------------------------
// roost check --config

#[test]
fn check_applies_the_config_limits_for_that_persona() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::copy(crate::guests::example("echo"), d.join("echo.wasm")).expect("copy");
    std::fs::copy(crate::guests::example("echo"), d.join("other.wasm")).expect("copy");
    // echo needs about 1.1 MiB of linear memory: 1 MiB for every persona is too little,
    // and [personas.echo.limits] grants echo (only) more.
    std::fs::write(d.join("tight.toml"), "[limits]\nmemory_bytes = 1048576\n").expect("write");
    std::fs::write(
        d.join("granted.toml"),
        "[limits]\nmemory_bytes = 1048576\n\n[personas.echo.limits]\nmemory_bytes = 8388608\n",
    )
    .expect("write");

    let ok = |out: Output| {
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let e = one_line_error(&roost(&["check", "--config", "tight.toml", "echo.wasm"], d));
    assert!(e.contains("memory"), "the limit is named: {e}");
    let stdout = ok(roost(
        &["check", "--config", "granted.toml", "echo.wasm"],
        d,
    ));
    assert!(stdout.contains("name:         echo"), "{stdout}");
    // The grant is for the file stem `echo`, not for any copy of the same code.
    let e = one_line_error(&roost(
        &["check", "--config", "granted.toml", "other.wasm"],
        d,
    ));
    assert!(e.contains("memory"), "{e}");
    // ROOST_CONFIG names the file too, and roost.toml here is read by default.
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(["check", "echo.wasm"])
        .current_dir(d)
        .env("ROOST_CONFIG", "tight.toml")
        .output()
        .expect("run roost");
    one_line_error(&out);
    std::fs::copy(d.join("tight.toml"), d.join("roost.toml")).expect("copy");
    one_line_error(&roost(&["check", "echo.wasm"], d));
    // A config that does not validate is refused, naming the key.
    std::fs::write(
        d.join("bad.toml"),
        "[personas.echo.limits]\nmemory_bytes = 0\n",
    )
    .expect("write");
    let e = one_line_error(&roost(&["check", "--config", "bad.toml", "echo.wasm"], d));
    assert!(e.contains("personas.echo.limits.memory_bytes"), "{e}");
}

#[test]
fn plain_http_to_a_remote_server_needs_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = ["run", "--server", "http://10.0.0.5:8787", "--print-config"];
    let out = roost(&base, dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("http://10.0.0.5:8787") && lines[0].contains("--insecure"),
        "{err}"
    );
    // The flag, and its variable, allow it.
    let out = roost(&[&base[..], &["--insecure"]].concat(), dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("insecure = true"));
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(base)
        .env("ROOST_INSECURE", "1")
        .current_dir(dir.path())
        .output()
        .expect("run roost");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Loopback over plain http stays allowed (local servers, `roost dev`).
    let out = roost(
        &["run", "--server", "http://127.0.0.1:8787", "--print-config"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_container_keeps_metrics_on_loopback_unless_configured() {
    let root = crate::guests::repo_root();
    let config = roost::config::Config::load(&root.join("deploy/container.toml"))
        .expect("deploy/container.toml loads");
    let metrics = config
        .telemetry
        .metrics
        .expect("the image sets a metrics address");
    assert!(metrics.ip().is_loopback(), "{metrics}");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    // Nothing in the image overrides the file's address (a variable would win).
    let env_lines: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !env_lines.iter().any(|l| l.contains("ROOST_METRICS")),
        "the Dockerfile must not set ROOST_METRICS"
    );
    assert!(dockerfile.contains("COPY deploy/container.toml /etc/roost/roost.toml"));
    assert!(dockerfile.contains("\"--addr\", \"127.0.0.1:9090\""));
}

#[test]
fn print_config_hides_the_store_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = roost(
        &[
            "run",
            "--print-config",
            "--store",
            "postgres://roost:s3cret@127.0.0.1:9/roost?password=s3cret",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("s3cret"), "{text}");
    let parsed = roost::config::Config::parse(&text, "printed").expect("prints valid TOML");
    assert_eq!(
        parsed.store.url,
        "postgres://roost:***@127.0.0.1:9/roost?password=***"
    );
}
