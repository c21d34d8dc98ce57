//! `roost status`: asks a running host (its metrics address) how its bots are, and
//! prints a table, the JSON, or — with `--health` — nothing but the verdict of
//! `/healthz` as the exit code (what a container's HEALTHCHECK wants).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;

use super::{HostStatus, ago, clock, error_reason, nonzero_drops, span};

/// How long to wait for the host.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where `roost status` looks without `--addr` or a `telemetry.metrics` setting
/// (what the Dockerfile and the systemd unit serve).
pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";

/// `roost status`: the table, the JSON (`json`), or only the health verdict
/// (`health_only`: prints `healthy` and succeeds, or fails with the reason).
pub async fn run(addr: &str, json: bool, health_only: bool) -> anyhow::Result<()> {
    let addr = connectable(addr);
    if health_only {
        return match health(&addr).await? {
            Ok(()) => {
                println!("healthy");
                Ok(())
            }
            Err(why) => anyhow::bail!("unhealthy: {why}"),
        };
    }
    let status = fetch(&addr).await?;
    let text = if json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        render(&status)
    };
    // A closed pipe (`roost status | head`) is not an error.
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A bind address as one to connect to: a host listening on all addresses
/// (`0.0.0.0:9090`, `[::]:9090`, as in a container) is asked on loopback.
pub fn connectable(addr: &str) -> String {
    match addr.trim().parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => addr.trim().to_string(),
    }
}

/// The base URL for `addr`: `HOST:PORT`, or a URL as is.
pub fn base_url(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .no_proxy()
        .build()
        .context("cannot set up an HTTP client")
}

fn unreachable(addr: &str, e: reqwest::Error) -> anyhow::Error {
    let why = if e.is_timeout() {
        "no answer within 5 s".to_string()
    } else if e.is_connect() {
        "nothing is listening there".to_string()
    } else {
        e.without_url().to_string()
    };
    anyhow::anyhow!(
        "cannot reach a roost host at {addr}: {why} (is `roost run --metrics {addr}` running?)"
    )
}

/// `GET /api/status` of the host at `addr`.
pub async fn fetch(addr: &str) -> anyhow::Result<HostStatus> {
    let url = format!("{}/api/status", base_url(addr));
    let resp = http()?
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(addr, e))?;
    if !resp.status().is_success() {
        anyhow::bail!(
            "{url} answered {}: is this a roost host's metrics address?",
            resp.status()
        );
    }
    resp.json()
        .await
        .with_context(|| format!("{url} did not answer with roost's status JSON"))
}

/// `GET /healthz` of the host at `addr`: `Ok(Ok(()))` when healthy, `Ok(Err(why))`
/// when the host says it is not.
pub async fn health(addr: &str) -> anyhow::Result<Result<(), String>> {
    let url = format!("{}/healthz", base_url(addr));
    let resp = http()?
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(addr, e))?;
    let ok = resp.status().is_success();
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if ok {
        return Ok(Ok(()));
    }
    let reason = body
        .get("reason")
        .and_then(|r| r.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{url} answered {code}"));
    Ok(Err(reason))
}

/// The table `roost status` prints.
pub fn render(s: &HostStatus) -> String {
    let mut out = String::new();
    let health = if s.healthy {
        "healthy".to_string()
    } else {
        format!(
            "UNHEALTHY ({})",
            s.health_reason.as_deref().unwrap_or("unknown")
        )
    };
    let _ = writeln!(
        out,
        "roost {}: {health}, up {}, {} bot{}",
        s.roost,
        span(s.uptime_secs),
        s.bots.len(),
        if s.bots.len() == 1 { "" } else { "s" }
    );
    if let Some(l) = &s.leases {
        let _ = writeln!(
            out,
            "host {} of {} live; leases ({} personas):",
            l.host,
            l.live_hosts,
            l.leases.len()
        );
        for lease in &l.leases {
            let holder = if lease.holder.is_empty() {
                "(released)"
            } else {
                lease.holder.as_str()
            };
            let mine = if lease.holder == l.host { " *" } else { "" };
            let expiry = if lease.expires_in_ms >= 0 {
                format!("expires in {:.1}s", lease.expires_in_ms as f64 / 1000.0)
            } else {
                "expired".to_string()
            };
            let _ = writeln!(
                out,
                "  {:<20} {:<28} epoch {:<5} {expiry}{mine}",
                lease.persona, holder, lease.epoch
            );
        }
    }
    if !s.bots.is_empty() {
        let header = [
            "BOT",
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
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for b in &s.bots {
            let name = match &b.name {
                Some(n) if *n != b.label => format!("{n} ({})", b.label),
                Some(n) => n.clone(),
                None => b.label.clone(),
            };
            let quarantine = match (b.quarantine.active, b.quarantine.remaining_secs) {
                (true, Some(r)) => format!("yes, {} left", span(r)),
                (true, None) => "yes".into(),
                (false, _) if b.quarantine.times > 0 => format!("no ({}x)", b.quarantine.times),
                (false, _) => "no".into(),
            };
            let drops = nonzero_drops(&b.dropped);
            let dropped = if drops.is_empty() {
                "-".to_string()
            } else {
                drops
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let last = match (&b.last_error, &b.connection_error) {
                (Some(e), _) => format!(
                    "{} ({})",
                    one_line(error_reason(&e.message), 70),
                    ago(s.generated_at_ms, e.at_ms)
                ),
                (None, Some(e)) => format!("connection: {}", one_line(e, 60)),
                (None, None) => "-".into(),
            };
            rows.push(vec![
                name,
                b.state.clone(),
                span(b.uptime_secs),
                if b.persona.version.is_empty() {
                    "?".into()
                } else {
                    b.persona.version.clone()
                },
                b.persona
                    .hash
                    .as_deref()
                    .map(|h| h[..h.len().min(12)].to_string())
                    .unwrap_or_else(|| "-".into()),
                b.calls.to_string(),
                b.errors.to_string(),
                quarantine,
                b.outbox_depth.to_string(),
                dropped,
                last,
            ]);
        }
        out.push('\n');
        table(&mut out, &rows);
    }
    for b in &s.bots {
        let Some(sh) = &b.shadow else { continue };
        let which = match &sh.running {
            Some(v) => format!("version {} listening", v.version),
            None => "stopped".into(),
        };
        let _ = writeln!(
            out,
            "\nshadow of {} ({which}): {}",
            b.label,
            super::shadow_counts(sh)
        );
        for p in sh.recent.iter().take(5) {
            let score = p
                .similarity
                .map(|x| format!(" ({x:.2})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} UTC  {}{score}  #{} <{}> {}",
                clock(p.at_ms),
                p.outcome,
                p.room,
                p.from,
                one_line(&p.text, 60)
            );
            let side = |acts: &[crate::bot::compare::Act]| {
                if acts.is_empty() {
                    "(nothing)".to_string()
                } else {
                    one_line(
                        &acts
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(" | "),
                        90,
                    )
                }
            };
            let _ = writeln!(out, "    live:   {}", side(&p.live));
            match &p.detail {
                Some(d) => {
                    let _ = writeln!(out, "    shadow: {} ({})", side(&p.shadow), one_line(d, 60));
                }
                None => {
                    let _ = writeln!(out, "    shadow: {}", side(&p.shadow));
                }
            }
        }
    }
    if let Some(r) = &s.reloads {
        let _ = writeln!(
            out,
            "\nreloads: {} loaded, {} reloaded, {} refused, {} stopped",
            r.loaded, r.reloaded, r.rejected, r.unloaded
        );
        for e in r.recent.iter().take(10) {
            let _ = writeln!(
                out,
                "  {} UTC  {:<9} {}: {}",
                clock(e.at_ms),
                e.event,
                e.label,
                one_line(&e.detail, 100)
            );
        }
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `text` on one line, control characters replaced, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max - 1).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_urls() {
        assert_eq!(connectable("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(connectable("[::]:9090"), "[::1]:9090");
        assert_eq!(connectable("10.0.0.2:9090"), "10.0.0.2:9090");
        assert_eq!(connectable("localhost:9090"), "localhost:9090");
        assert_eq!(base_url("127.0.0.1:9090"), "http://127.0.0.1:9090");
        assert_eq!(base_url("http://[::1]:9090/"), "http://[::1]:9090");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["BOT".to_string(), "STATE".into(), "X".into()],
            vec!["greeter".into(), "active".into(), "-".into()],
        ];
        let mut out = String::new();
        table(&mut out, &rows);
        assert_eq!(out, "BOT      STATE   X\ngreeter  active  -\n");
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
