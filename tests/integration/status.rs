//! The status API and page on the metrics address, and `roost status`, against a
//! host running three bots: `echo` (then swapped to `echo-v2` by hot reload), a
//! copy of it, and the `panic` test guest, which fails every call until it is
//! quarantined.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use roost::bot::host::BotHost;
use roost::devserver::{DevServer, ServerEvent};
use roost::status::HostStatus;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::guests::{example, guest};
use crate::support::{config_for, install, server, wait_event, wait_message};

/// A host serving reloads and its metrics address, with the bots above.
struct Running {
    server: DevServer,
    _dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<BotHost>,
}

impl Running {
    /// Starts the host, has every bot see a few messages (the panic guest fails on
    /// each and ends up quarantined), swaps `echo` to version 2 and waits until the
    /// status says all of that.
    async fn start() -> Running {
        let server = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        install(dir.path(), &example("echo"), "echo");
        install(dir.path(), &example("echo"), "parrot");
        install(dir.path(), &guest("panic"), "panic");
        let mut config = config_for(&server.base_url(), dir.path());
        config.reload.debounce_ms = 100;
        config.personas.insert("parrot".into(), Default::default());
        config.personas.get_mut("parrot").unwrap().name = Some("parrot".into());
        let mut events = server.state().subscribe();

        let mut host = BotHost::start(config).await.expect("start");
        host.context.probes.set_reload_stats(host.reload_stats());
        let (stop, stopped) = oneshot::channel::<()>();
        let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
        let addr = roost::status::serve(
            "127.0.0.1:0".parse().unwrap(),
            host.context.probes.clone(),
            async {
                let _ = metrics_stopped.await;
            },
        )
        .await
        .expect("metrics server");
        let task = tokio::spawn(async move {
            host.serve_reloads(async {
                let _ = stopped.await;
            })
            .await;
            let _ = metrics_stop.send(());
            host
        });
        // In whatever order they come.
        let mut waiting = vec!["echo", "parrot", "panic"];
        while !waiting.is_empty() {
            let left = waiting.clone();
            wait_event(&mut events, Duration::from_secs(30), "the bots to join", |e| {
                matches!(e, ServerEvent::Joined { agent, .. } if left.contains(&agent.as_str()))
            })
            .await;
            waiting.retain(|b| {
                server
                    .state()
                    .room_agents("lobby")
                    .unwrap_or_default()
                    .iter()
                    .all(|a| a.name != *b)
            });
        }

        let post = |text: &str| {
            server
                .state()
                .post_message("ada", "lobby", text)
                .expect("post")
        };
        post("@echo count me");
        wait_message(&mut events, Duration::from_secs(10), |m| m.from == "echo")
            .await
            .expect("echo answered");
        // Five failures in a row quarantine the panic guest.
        for i in 0..5 {
            post(&format!("message {i} for the panic guest"));
        }
        std::fs::copy(guest("echo-v2"), dir.path().join("plugins/.echo.tmp")).expect("copy");
        std::fs::rename(
            dir.path().join("plugins/.echo.tmp"),
            dir.path().join("plugins/echo.wasm"),
        )
        .expect("rename");
        let running = Running {
            server,
            _dir: dir,
            addr,
            stop,
            task,
        };
        running
            .status_until("echo at 2.0.0 and panic quarantined", |s| {
                let echo = bot(s, "echo");
                let panic = bot(s, "panic");
                echo.persona.version == "2.0.0" && panic.quarantine.active && echo.calls >= 1
            })
            .await;
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn status(&self) -> HostStatus {
        let resp = reqwest::get(self.url("/api/status")).await.expect("GET");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("status JSON")
    }

    /// Polls `/api/status` (bounded) until `pred` holds.
    async fn status_until(&self, what: &str, pred: impl Fn(&HostStatus) -> bool) -> HostStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let host = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("reloads stopped")
            .expect("reload task");
        host.stop().await;
        self.server.shutdown().await;
    }
}

fn bot<'a>(s: &'a HostStatus, label: &str) -> &'a roost::status::BotStatus {
    s.bots
        .iter()
        .find(|b| b.label == label)
        .unwrap_or_else(|| panic!("no bot {label} in {s:#?}"))
}

/// Runs the `roost` binary with `args` (off the async runtime).
async fn roost(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_roost"))
            .args(&args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("ROOST_METRICS")
            .env_remove("ROOST_JSON")
            .output()
            .expect("run roost")
    })
    .await
    .expect("join")
}

/// The text a person reads in `html`: tags and the head (title, style) dropped,
/// entities decoded, whitespace collapsed.
fn visible_text(html: &str) -> String {
    let body = html.split("<body").nth(1).unwrap_or(html);
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What a person must be able to read on the page, whatever rendered it.
fn assert_page_says_it_all(text: &str, s: &HostStatus) {
    for phrase in [
        "roost",
        "healthy",
        "3 bots · 3 connected · 1 quarantined",
        "Bots",
        "Connection",
        "Persona",
        "Last error",
        "echo",
        "parrot",
        "panic",
        "active",
        "v2.0.0",
        "v0.1.0",
        "quarantined",
        "left",
        "Recent reloads",
        "reloaded",
        "version 2.0.0",
        "loaded",
        "panicked",
    ] {
        assert!(text.contains(phrase), "the page says {phrase:?}:\n{text}");
    }
    let echo_hash = bot(s, "echo").persona.hash.clone().expect("hash");
    assert!(text.contains(&echo_hash[..12]), "the short hash:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_page_and_command_describe_the_bots() {
    let host = Running::start().await;

    // The JSON.
    let s = host.status().await;
    assert_eq!(s.roost, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        s.bots.iter().map(|b| b.label.as_str()).collect::<Vec<_>>(),
        ["echo", "panic", "parrot"]
    );
    let echo = bot(&s, "echo");
    assert!(echo.connected && echo.state == "active", "{echo:?}");
    assert_eq!(echo.name.as_deref(), Some("echo"));
    let mut rooms = echo.rooms.clone();
    rooms.sort();
    assert_eq!(rooms, ["builders", "lobby"], "echo-v2's rooms");
    assert_eq!(echo.reloads, 1);
    assert_eq!(echo.errors, 0);
    assert!(echo.last_error.is_none());
    assert_eq!(echo.outbox_depth, 0);
    assert!(echo.dropped.contains_key("loop-guard") && echo.dropped.contains_key("queue-full"));
    let parrot = bot(&s, "parrot");
    assert_eq!(parrot.persona.version, "0.1.0");
    assert_ne!(
        parrot.persona.hash, echo.persona.hash,
        "different components"
    );
    assert_eq!(parrot.persona.hash.as_ref().map(String::len), Some(64));
    let panic = bot(&s, "panic");
    assert!(panic.errors >= 5, "{panic:?}");
    assert!(panic.quarantine.active && panic.quarantine.times >= 1);
    assert!(
        panic
            .quarantine
            .remaining_secs
            .is_some_and(|r| r > 0 && r <= 30)
    );
    let last = panic.last_error.as_ref().expect("panic's last error");
    assert!(last.message.contains("panicked"), "{last:?}");
    assert!(last.at_ms <= s.generated_at_ms);
    // Health is about connections; the quarantined bot is still connected.
    assert!(s.healthy, "{s:?}");
    let reloads = s.reloads.as_ref().expect("reloads");
    assert_eq!((reloads.loaded, reloads.reloaded), (3, 1));
    let newest = &reloads.recent[0];
    assert_eq!(
        (newest.label.as_str(), newest.event.as_str()),
        ("echo", "reloaded")
    );
    assert_eq!(newest.detail, "version 2.0.0");

    // The page: the same facts, for a person, with nothing to load or run.
    let resp = reqwest::get(host.url("/")).await.expect("GET /");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let html = resp.text().await.expect("body");
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
    assert!(!html.contains("<script") && !html.contains("src="));
    assert!(!html.contains("https://") && !html.contains("<link"));
    assert_page_says_it_all(&visible_text(&html), &s);

    // `roost status`: the table, the JSON, the health verdict.
    let addr = host.addr.to_string();
    let out = roost(vec!["status".into(), "--addr".into(), addr.clone()]).await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(&format!("roost {}: healthy, up ", s.roost)),
        "{table}"
    );
    assert!(lines[0].ends_with(", 3 bots"), "{table}");
    let header = lines
        .iter()
        .find(|l| l.starts_with("BOT "))
        .expect("header");
    for col in [
        "STATE",
        "UP",
        "PERSONA",
        "HASH",
        "CALLS",
        "ERRORS",
        "QUARANTINE",
        "OUTBOX",
        "DROPPED",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_string()
    };
    assert!(row("echo").contains(" active "), "{table}");
    assert!(row("echo").contains(" 2.0.0 "), "{table}");
    assert!(row("panic").contains("yes, "), "quarantined:\n{table}");
    assert!(row("panic").contains("panicked"), "last error:\n{table}");
    assert!(table.contains("reloaded  echo: version 2.0.0"), "{table}");

    let out = roost(vec![
        "status".into(),
        "--json".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(out.status.success());
    let json: HostStatus = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(json.bots.len(), 3);
    assert_eq!(bot(&json, "echo").persona, bot(&s, "echo").persona);

    let out = roost(vec![
        "status".into(),
        "--health".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "healthy");

    host.finish().await;

    // Nobody there: one line, and a failure.
    for args in [vec!["status"], vec!["status", "--health"]] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.extend(["--addr".into(), addr.clone()]);
        let out = roost(args).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!("error: cannot reach a roost host at {addr}")),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_host_fails_the_health_check() {
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = roost::status::serve(
        "127.0.0.1:0".parse().unwrap(),
        roost::telemetry::Probes::default(),
        async {
            let _ = stopped.await;
        },
    )
    .await
    .expect("metrics server");
    let out = roost(vec![
        "status".into(),
        "--health".into(),
        "--addr".into(),
        addr.to_string(),
    ])
    .await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: unhealthy: no bots are running"
    );
    let page = reqwest::get(format!("http://{addr}/"))
        .await
        .expect("GET /")
        .text()
        .await
        .expect("body");
    let text = visible_text(&page);
    assert!(text.contains("unhealthy: no bots are running"), "{text}");
    assert!(text.contains("No bot is running."), "{text}");
    assert!(text.contains("Hot reload is off on this host."), "{text}");
    let _ = stop.send(());
}

/// The page as a browser shows it: Debian's Chromium, headless, prints the DOM it
/// built (`--dump-dom`); the test reads it as a person would, as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium: set ROOST_CHROMIUM (e.g. /usr/bin/chromium) and run with --ignored; .ci/run does"]
async fn the_status_page_reads_right_in_chromium() {
    let chromium = std::env::var_os("ROOST_CHROMIUM")
        .filter(|v| !v.is_empty())
        .expect("ROOST_CHROMIUM names the chromium binary");
    let host = Running::start().await;
    let s = host.status().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let url = host.url("/");
    let dom = tokio::task::spawn_blocking(move || {
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--virtual-time-budget=2000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(&url)
            .output()
            .expect("run chromium")
    })
    .await
    .expect("join");
    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.status.success() && html.contains("</html>"),
        "chromium failed ({}):\n{}",
        dom.status,
        String::from_utf8_lossy(&dom.stderr)
    );
    // What Chromium parsed: the refresh is there, nothing scripted was added.
    assert!(html.contains("http-equiv=\"refresh\""), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert_page_says_it_all(&visible_text(&html), &s);
    host.finish().await;
}
