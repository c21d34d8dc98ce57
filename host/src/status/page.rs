//! The status page at `/`: one server-rendered HTML document with its style
//! inline, no script, no image, nothing fetched from anywhere; a `<meta
//! http-equiv="refresh">` reloads it every [`REFRESH_SECS`](super::REFRESH_SECS)
//! seconds. Everything that came from the network or a persona (names, rooms,
//! errors) is escaped.

use std::fmt::Write as _;

use super::{BotStatus, HostStatus, ago, clock, error_reason, nonzero_drops, span};

/// `text` safe inside HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5b6475; --line: #d9dde5;
  --bg: #ffffff; --panel: #f5f7fa; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ef; --muted: #9aa3b2;
  --line: #363c48; --bg: #14171c; --panel: #1c2027; --ok: #3fb950; --warn: #d29922;
  --bad: #f85149; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 1.5rem 2rem 3rem; font: 15px/1.45 system-ui, -apple-system,
  "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4rem 1rem;
  border-bottom: 1px solid var(--line); padding-bottom: .8rem; margin-bottom: 1.2rem; }
h1 { font-size: 1.5rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.8rem 0 .6rem; }
.meta, small, .muted { color: var(--muted); }
.meta { width: 100%; margin: 0; font-size: .9rem; }
.meta a { color: inherit; }
.badge { display: inline-block; padding: .05rem .55rem; border-radius: 1rem;
  font-size: .85rem; font-weight: 600; border: 1px solid currentColor; white-space: nowrap; }
.ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: var(--panel);
  border: 1px solid var(--line); }
th, td { text-align: left; vertical-align: top; padding: .5rem .7rem;
  border-bottom: 1px solid var(--line); }
th { font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: .85rem ui-monospace, SFMono-Regular, Menlo, monospace; }
.err { max-width: 28rem; overflow-wrap: anywhere; }
.nowrap { white-space: nowrap; }
.totals { margin-top: .6rem; }
"#;

/// The whole page.
pub fn render(s: &HostStatus) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let connected = s.bots.iter().filter(|b| b.connected).count();
    let quarantined = s.bots.iter().filter(|b| b.quarantine.active).count();
    let health = if s.healthy {
        ("ok", "healthy".to_string())
    } else {
        (
            "bad",
            format!(
                "unhealthy: {}",
                s.health_reason.as_deref().unwrap_or("unknown")
            ),
        )
    };
    let title = format!(
        "roost · {} bot{} · {}",
        s.bots.len(),
        if s.bots.len() == 1 { "" } else { "s" },
        if s.healthy { "healthy" } else { "unhealthy" }
    );
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<header>\n\
         <h1>roost</h1>\n<span class=\"badge {hclass}\">{htext}</span>\n\
         <span>{bots} bot{bots_s} · {connected} connected · {quarantined} quarantined</span>\n\
         <p class=\"meta\">roost {version} · up {up} · updated {at} UTC · refreshes every \
         {refresh} s · <a href=\"/api/status\">JSON</a> · <a href=\"/metrics\">metrics</a></p>\n\
         </header>\n<main>\n",
        refresh = super::REFRESH_SECS,
        title = escape(&title),
        hclass = health.0,
        htext = escape(&health.1),
        bots = s.bots.len(),
        bots_s = if s.bots.len() == 1 { "" } else { "s" },
        version = escape(&s.roost),
        up = span(s.uptime_secs),
        at = clock(s.generated_at_ms),
    );
    bots_table(&mut out, s);
    shadows_section(&mut out, s);
    reloads_section(&mut out, s);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

fn bots_table(out: &mut String, s: &HostStatus) {
    out.push_str("<section id=\"bots\">\n<h2>Bots</h2>\n");
    if s.bots.is_empty() {
        out.push_str(
            "<p class=\"muted\">No bot is running. Put a NAME.wasm in the plugins folder.</p>\n</section>\n",
        );
        return;
    }
    out.push_str(
        "<div class=\"scroll\"><table>\n<thead><tr><th>Bot</th><th>Connection</th>\
         <th>Persona</th><th>Calls</th><th>Errors</th><th>Quarantine</th><th>Outbox</th>\
         <th>Dropped</th><th>Last error</th></tr></thead>\n<tbody>\n",
    );
    for b in &s.bots {
        bot_row(out, b, s.generated_at_ms);
    }
    out.push_str("</tbody>\n</table></div>\n</section>\n");
}

fn bot_row(out: &mut String, b: &BotStatus, now_ms: u64) {
    let name = b.name.as_deref().unwrap_or(&b.label);
    let rooms: Vec<String> = b.rooms.iter().map(|r| format!("#{}", escape(r))).collect();
    let label = if name == b.label {
        String::new()
    } else {
        format!("{}.wasm · ", escape(&b.label))
    };
    let state_class = if b.connected {
        "ok"
    } else if b.state.starts_with("disconnected") || b.state == "stopped" {
        "bad"
    } else {
        "warn"
    };
    let connection = match b.connected_secs {
        Some(c) => format!("connected {}", span(c)),
        None => format!("up {}", span(b.uptime_secs)),
    };
    let reconnects = match b.reconnects {
        0 => String::new(),
        1 => ", 1 reconnect".to_string(),
        n => format!(", {n} reconnects"),
    };
    let hash = match &b.persona.hash {
        Some(h) => format!(
            "<br><code title=\"sha256:{full}\">{short}</code>",
            full = escape(h),
            short = escape(&h[..h.len().min(12)])
        ),
        None => String::new(),
    };
    let version = if b.persona.version.is_empty() {
        "?".to_string()
    } else {
        format!("v{}", escape(&b.persona.version))
    };
    let reloaded = match b.reloads {
        0 => String::new(),
        1 => "<br><small>reloaded once</small>".into(),
        n => format!("<br><small>reloaded {n} times</small>"),
    };
    let errors = if b.errors > 0 {
        format!("<td class=\"num bad\">{}</td>", b.errors)
    } else {
        "<td class=\"num\">0</td>".into()
    };
    let quarantine = match (b.quarantine.active, b.quarantine.remaining_secs) {
        (true, Some(r)) => format!(
            "<span class=\"badge bad\">quarantined</span><br><small>{} left</small>",
            span(r)
        ),
        (true, None) => "<span class=\"badge bad\">quarantined</span>".into(),
        (false, _) if b.quarantine.times > 0 => format!(
            "no<br><small>{} time{} before</small>",
            b.quarantine.times,
            if b.quarantine.times == 1 { "" } else { "s" }
        ),
        (false, _) => "no".into(),
    };
    let drops = nonzero_drops(&b.dropped);
    let dropped = if drops.is_empty() {
        "none".to_string()
    } else {
        drops
            .iter()
            .map(|(reason, n)| format!("{} {n}", escape(reason)))
            .collect::<Vec<_>>()
            .join("<br>")
    };
    let mut last = Vec::new();
    if let Some(e) = &b.last_error {
        last.push(format!(
            "<span title=\"{}\">{}</span><br><small>persona, {}</small>",
            escape(&e.message),
            escape(error_reason(&e.message)),
            ago(now_ms, e.at_ms)
        ));
    }
    if let Some(e) = &b.connection_error {
        last.push(format!("{}<br><small>connection</small>", escape(e)));
    }
    let last = if last.is_empty() {
        "none".to_string()
    } else {
        last.join("<br>")
    };
    let _ = writeln!(
        out,
        "<tr>\
         <td><strong>{name}</strong><br><small>{label}{rooms}</small></td>\
         <td><span class=\"badge {state_class}\">{state}</span><br><small>{connection}{reconnects}</small></td>\
         <td>{version}{hash}{reloaded}</td>\
         <td class=\"num\">{calls}</td>{errors}\
         <td>{quarantine}</td>\
         <td class=\"num\">{outbox}</td>\
         <td class=\"nowrap\">{dropped}</td>\
         <td class=\"err\">{last}</td></tr>",
        name = escape(name),
        rooms = rooms.join(" "),
        state = escape(&b.state),
        calls = b.calls,
        outbox = b.outbox_depth,
    );
}

/// The bots' shadows: counts, then the last differing pairs side by side.
fn shadows_section(out: &mut String, s: &HostStatus) {
    let shadows: Vec<(&BotStatus, &super::ShadowStatus)> = s
        .bots
        .iter()
        .filter_map(|b| b.shadow.as_ref().map(|sh| (b, sh)))
        .collect();
    if shadows.is_empty() {
        return;
    }
    out.push_str("<section id=\"shadows\">\n<h2>Shadows</h2>\n");
    for (b, sh) in shadows {
        let which = match &sh.running {
            Some(v) => format!("version {} listening", v.version),
            None => "stopped".into(),
        };
        let _ = writeln!(
            out,
            "<p><strong>{label}</strong> <span class=\"muted\">({which})</span>: {counts}</p>",
            label = escape(&b.label),
            which = escape(&which),
            counts = escape(&super::shadow_counts(sh)),
        );
        if sh.recent.is_empty() {
            continue;
        }
        out.push_str(
            "<div class=\"scroll\"><table>\n<thead><tr><th>When (UTC)</th><th>Outcome</th>\
             <th>Message</th><th>Live</th><th>Shadow</th></tr></thead>\n<tbody>\n",
        );
        for p in &sh.recent {
            let side = |acts: &[crate::bot::compare::Act]| {
                if acts.is_empty() {
                    "<span class=\"muted\">nothing</span>".to_string()
                } else {
                    acts.iter()
                        .map(|a| escape(&a.to_string()))
                        .collect::<Vec<_>>()
                        .join("<br>")
                }
            };
            let outcome = match p.similarity {
                Some(x) => format!("{} ({x:.2})", p.outcome),
                None => p.outcome.to_string(),
            };
            let detail = p
                .detail
                .as_deref()
                .map(|d| format!("<br><small>{}</small>", escape(d)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "<tr><td>{at}</td><td class=\"nowrap\">{outcome}</td>\
                 <td class=\"err\">#{room} &lt;{from}&gt; {text}</td><td class=\"err\">{live}</td>\
                 <td class=\"err\">{shadow}{detail}</td></tr>",
                at = clock(p.at_ms),
                outcome = escape(&outcome),
                room = escape(&p.room),
                from = escape(&p.from),
                text = escape(&p.text),
                live = side(&p.live),
                shadow = side(&p.shadow),
            );
        }
        out.push_str("</tbody>\n</table></div>\n");
    }
    out.push_str("</section>\n");
}

fn reloads_section(out: &mut String, s: &HostStatus) {
    out.push_str("<section id=\"reloads\">\n<h2>Recent reloads</h2>\n");
    let Some(r) = &s.reloads else {
        out.push_str("<p class=\"muted\">Hot reload is off on this host.</p>\n</section>\n");
        return;
    };
    if r.recent.is_empty() {
        out.push_str("<p class=\"muted\">Nothing loaded or reloaded yet.</p>\n");
    } else {
        out.push_str(
            "<div class=\"scroll\"><table>\n<thead><tr><th>When (UTC)</th><th>Persona</th>\
             <th>What</th><th>Detail</th></tr></thead>\n<tbody>\n",
        );
        for e in &r.recent {
            let class = match e.event.as_str() {
                "rejected" => "bad",
                "unloaded" => "warn",
                _ => "ok",
            };
            let _ = writeln!(
                out,
                "<tr><td>{at}<br><small>{ago}</small></td><td>{label}</td>\
                 <td><span class=\"badge {class}\">{event}</span></td><td class=\"err\">{detail}</td></tr>",
                at = clock(e.at_ms),
                ago = ago(s.generated_at_ms, e.at_ms),
                label = escape(&e.label),
                event = escape(&e.event),
                detail = escape(&e.detail),
            );
        }
        out.push_str("</tbody>\n</table></div>\n");
    }
    let _ = write!(
        out,
        "<p class=\"totals muted\">Since start: {} loaded · {} reloaded · {} refused · {} stopped</p>\n</section>\n",
        r.loaded, r.reloaded, r.rejected, r.unloaded
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{LastError, PersonaVersion, Quarantine, ReloadEntry, Reloads};
    use super::*;

    fn sample() -> HostStatus {
        HostStatus {
            roost: "0.1.0".into(),
            uptime_secs: 125,
            generated_at_ms: 1_000_000,
            healthy: true,
            health_reason: None,
            bots: vec![BotStatus {
                label: "evil".into(),
                name: Some("<script>alert(1)</script>".into()),
                state: "active".into(),
                connected: true,
                uptime_secs: 120,
                connected_secs: Some(119),
                reconnects: 0,
                rooms: vec!["lobby".into()],
                persona: PersonaVersion {
                    version: "1.2.3".into(),
                    hash: Some("ab".repeat(32)),
                },
                calls: 7,
                errors: 1,
                quarantine: Quarantine {
                    active: false,
                    remaining_secs: None,
                    times: 0,
                },
                last_error: Some(LastError {
                    message: "trap: \"unreachable\" <b>".into(),
                    at_ms: 990_000,
                }),
                connection_error: None,
                messages_in: 9,
                messages_out: 3,
                outbox_depth: 0,
                dropped: BTreeMap::from([("loop-guard".into(), 2), ("secret".into(), 0)]),
                reloads: 1,
                shadow: Some(super::super::ShadowStatus {
                    running: None,
                    outcomes: BTreeMap::from([("different".into(), 1), ("same".into(), 4)]),
                    calls: 5,
                    errors: 0,
                    quarantined: false,
                    recent: vec![crate::bot::compare::ShadowPair {
                        at_ms: 999_000,
                        bot: "evil".into(),
                        outcome: crate::bot::compare::Outcome::Different,
                        similarity: Some(0.5),
                        room: "lobby".into(),
                        from: "<img>".into(),
                        text: "hi".into(),
                        timestamp_ms: 1,
                        live: vec![],
                        shadow: vec![crate::bot::compare::Act {
                            kind: "say".into(),
                            room: "lobby".into(),
                            text: "<script>x</script>".into(),
                        }],
                        detail: None,
                        shadow_version: "2".into(),
                    }],
                }),
            }],
            leases: None,
            reloads: Some(Reloads {
                loaded: 1,
                reloaded: 1,
                rejected: 0,
                unloaded: 0,
                recent: vec![ReloadEntry {
                    at_ms: 995_000,
                    label: "evil".into(),
                    event: "reloaded".into(),
                    detail: "version 1.2.3".into(),
                }],
            }),
        }
    }

    #[test]
    fn the_page_escapes_what_came_from_outside_and_loads_nothing() {
        let page = render(&sample());
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script"));
        assert!(page.contains("trap: &quot;unreachable&quot; &lt;b&gt;"));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(!page.contains("src="));
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(page.contains("loop-guard 2"));
        assert!(!page.contains("secret 0"), "zero drops are left out");
        assert!(page.contains("v1.2.3"));
        assert!(page.contains(&"ab".repeat(6)));
        assert!(page.contains("persona, 10 s ago"));
        assert!(page.contains("reloaded once"));
        assert!(page.contains("same 4, different 1"));
        assert!(page.contains("different (0.50)"));
        assert!(page.contains("&lt;img&gt;") && page.contains("&lt;script&gt;x"));
    }
}
