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
