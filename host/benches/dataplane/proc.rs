//! Child processes (`roost serve`, `roost run`, `roost build`): spawned with a death
//! signal tied to the bench, their stderr drained and summarised by a thread, stopped
//! with SIGTERM then SIGKILL, and killed by [`Proc`]'s `Drop` on every other path.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Problem lines (WARN, ERROR, panics) kept verbatim, from the start of the log.
const KEEP_PROBLEMS: usize = 6;
/// Last lines of the log kept verbatim (to explain an early exit).
const KEEP_TAIL: usize = 8;
/// Longest line kept verbatim.
const KEEP_CHARS: usize = 400;

/// What a child wrote on stderr, summarised as it goes.
#[derive(Default)]
pub struct LogSummary {
    pub lines: u64,
    pub warnings: u64,
    pub errors: u64,
    pub problems: Vec<String>,
    pub tail: VecDeque<String>,
    /// For each watched substring: how many lines held it, and the first such line.
    pub watched: HashMap<&'static str, (u64, String)>,
}

impl LogSummary {
    fn add(&mut self, raw: &str, watch: &[&'static str]) {
        let line = strip_ansi(raw);
        self.lines += 1;
        let lv = level(&line);
        match lv {
            Some("WARN") => self.warnings += 1,
            Some("ERROR") => self.errors += 1,
            _ => {}
        }
        let problem = lv.is_some();
        let kept: String = line.chars().take(KEEP_CHARS).collect();
        if problem && self.problems.len() < KEEP_PROBLEMS {
            self.problems.push(kept.clone());
        }
        for w in watch {
            if line.contains(w) {
                let e = self.watched.entry(*w).or_insert((0, line.clone()));
                e.0 += 1;
            }
        }
        if self.tail.len() == KEEP_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(kept);
    }

    pub fn to_json(&self) -> Value {
        json!({
            "lines": self.lines,
            "warnings": self.warnings,
            "errors": self.errors,
            "first_problems": self.problems,
        })
    }
}

/// The level of a tracing line: JSON (`"level":"WARN"`) or human
/// (`2026-01-01T00:00:00Z  WARN target: ...`); a panic counts as ERROR.
fn level(line: &str) -> Option<&'static str> {
    if line.contains("panicked at") {
        return Some("ERROR");
    }
    if line.starts_with('{') {
        let at = line.find("\"level\":\"")? + 9;
        return ["ERROR", "WARN"]
            .into_iter()
            .find(|lv| line[at..].starts_with(lv));
    }
    let head: Vec<&str> = line.split_whitespace().take(3).collect();
    ["ERROR", "WARN"].into_iter().find(|lv| head.contains(lv))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running child. Dropping it kills it (SIGKILL) and reaps it.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: Arc<Mutex<LogSummary>>,
}

impl Proc {
    /// Spawns `cmd` with stdin and stdout closed and stderr summarised (or inherited,
    /// when `capture` is false); lines holding one of `watch` are counted.
    ///
    /// The child gets SIGKILL if the thread that spawned it ends (the bench's main
    /// thread: spawn from the main future, never from a blocking-pool thread), so it
    /// cannot outlive a bench that was killed or exited without running `Drop`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        capture: bool,
        watch: &'static [&'static str],
    ) -> anyhow::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        let log = Arc::new(Mutex::new(LogSummary::default()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::Builder::new()
                .name(format!("{name}-stderr"))
                .spawn(move || {
                    let mut reader = BufReader::new(stderr);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match reader.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&buf);
                                lock(&log).add(line.trim_end(), watch);
                            }
                        }
                    }
                })?;
        }
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// An error naming the child, its exit status and the end of its log.
    pub fn died(&mut self) -> Option<anyhow::Error> {
        let status = self.exited()?;
        let tail: Vec<String> = lock(&self.log).tail.iter().cloned().collect();
        Some(anyhow::anyhow!(
            "{} exited early ({status}); last lines: {}",
            self.name,
            tail.join(" | ")
        ))
    }

    /// (count, first line) of lines holding watched substring `w`.
    pub fn watched(&self, w: &str) -> Option<(u64, String)> {
        lock(&self.log).watched.get(w).cloned()
    }

    /// Memory and resources of the child right now.
    pub fn mem(&self) -> Option<Mem> {
        self.pid().and_then(Mem::of)
    }

    pub fn log_json(&self) -> Value {
        lock(&self.log).to_json()
    }

    /// Waits for the child to exit by itself, up to `limit`; kills it after that.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                anyhow::bail!("{} did not finish within {limit:?}: killed", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL after `grace`. Reports how it went.
    pub async fn stop(&mut self, grace: Duration) -> Value {
        let Some(child) = self.child.as_mut() else {
            return json!({"status": "not running"});
        };
        if let Ok(Some(st)) = child.try_wait() {
            self.child = None;
            return json!({"exited_before_stop": st.to_string()});
        }
        let t0 = Instant::now();
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return json!({
                    "status": st.to_string(),
                    "shutdown_ms": ms(t0.elapsed()),
                    "killed": false,
                });
            }
            if t0.elapsed() >= grace {
                self.kill();
                return json!({
                    "status": "killed",
                    "shutdown_ms": ms(t0.elapsed()),
                    "killed": true,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// From /proc/PID: resident and peak memory, threads, open files.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl Mem {
    pub fn of(pid: u32) -> Option<Mem> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Some(Mem {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:").unwrap_or(0),
            threads: field("Threads:").unwrap_or(0),
            fds,
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "rss_kib": self.rss_kib,
            "peak_rss_kib": self.hwm_kib,
            "threads": self.threads,
            "open_files": self.fds,
        })
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises this process's soft open-files limit to the hard one (children inherit it).
/// Returns the limit in force.
pub fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Hard-links `from` to `to`, copying when a link is impossible.
pub fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(|_| ()))
}

/// The 1-minute load average (other work on this machine skews every number).
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
