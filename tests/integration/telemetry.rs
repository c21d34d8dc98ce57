//! `/metrics` and `/healthz` against running bots.

use std::time::Duration;

use roost::bot::host::BotHost;
use roost::devserver::ServerEvent;

use crate::guests::example;
use crate::support::{config_for, install, server, wait_event, wait_message};

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_describe_the_running_bots() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let config = config_for(&server.base_url(), dir.path());
    let mut events = server.state().subscribe();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let empty = roost::telemetry::Probes::default();
    let addr = roost::status::serve("127.0.0.1:0".parse().unwrap(), empty.clone(), async {
        let _ = stop_rx.await;
    })
    .await
    .expect("metrics server");
    // No bots: unhealthy, with a JSON reason.
    let (status, body) = get(&format!("http://{addr}/healthz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no bots"), "{body}");
    let _ = stop_tx.send(());

    let host = BotHost::start(config).await.expect("start");
    host.context.probes.set_reload_stats(host.reload_stats());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = roost::status::serve(
        "127.0.0.1:0".parse().unwrap(),
        host.context.probes.clone(),
        async {
            let _ = stop_rx.await;
        },
    )
    .await
    .expect("metrics server");
    wait_event(
        &mut events,
        Duration::from_secs(20),
        "echo to join",
        |e| matches!(e, ServerEvent::Joined { agent, .. } if agent == "echo"),
    )
    .await;
    server
        .state()
        .post_message("ada", "lobby", "@echo count me")
        .expect("post");
    wait_message(&mut events, Duration::from_secs(10), |m| m.from == "echo")
        .await
        .expect("echo answered");

    // Counters are copied after the message is handled; poll briefly.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = get(&format!("http://{addr}/metrics")).await.1;
        if sample(&metrics, "roost_persona_calls_total{bot=\"echo\"}").unwrap_or(0.0) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(
            &metrics,
            "roost_bot_connection_state{bot=\"echo\",state=\"active\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "roost_persona_calls_total{bot=\"echo\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "roost_persona_errors_total{bot=\"echo\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "roost_bot_messages_in_total{bot=\"echo\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "roost_persona_call_seconds_count{bot=\"echo\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    for name in [
        "roost_bot_reconnects_total",
        "roost_bot_messages_out_total",
        "roost_bot_outbox_depth",
        "roost_bot_blocked_total",
        "roost_bot_rate_limited_total",
        "roost_bot_loop_guarded_total",
        "roost_persona_reloads_total",
        "roost_persona_quarantined",
        "roost_bot_rejoins_total",
        "roost_bot_history_gaps_total",
        "roost_bot_recoveries_overdue_total",
        "roost_bot_outbox_unconfirmed_total",
        "roost_bot_outbox_unsaved_total",
        "roost_bot_reregistrations_total",
        "roost_bot_reregistrations_refused_total",
        "roost_bot_server_throttles_total",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{bot=\"echo\"")),
            "{name} missing:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("roost_persona_call_seconds_bucket{le=\"+Inf\",bot=\"echo\"}")),
        "{metrics}"
    );
    // Host-wide hot-reload and compile-cache counters: echo was loaded once, compiled
    // (a cache miss: the state folder is new).
    assert_eq!(
        sample(&metrics, "roost_reload_events_total{event=\"loaded\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "roost_compile_cache_total{event=\"miss\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("roost_reload_last_latency_seconds "),
        "{metrics}"
    );
    let (status, body) = get(&format!("http://{addr}/healthz")).await;
    assert_eq!(status, 200, "{body}");

    host.stop().await;
    let _ = stop_tx.send(());
    server.shutdown().await;
}
