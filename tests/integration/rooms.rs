//! Joins and leaves a persona asks for are held to a per-bot rate and a room count
//! (issue 13, item 7): the `roomhopper` guest through the real pipeline
//! (`BotCore`: sandbox, policy, room limits) on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use roost::bot::core::{BotCore, Effect};
use roost::bot::history::History;
use roost::plugin::{Limits, PersonaContext, Sandbox};
use roost::policy::clock::Clock;
use roost::policy::{BotIdentity, Policy, PolicyConfig};
use roost::protocol::ChatMessage;
use roost::session::Membership;

use crate::guests::guest;
use crate::support::runtime;

async fn hopper(limits: Limits, rooms: &[&str]) -> BotCore {
    let rt = runtime();
    let component = Arc::new(rt.load_file(&guest("roomhopper")).expect("load"));
    let ctx = PersonaContext::sandbox("roomhopper");
    let mut sandbox = Sandbox::new(rt, component, ctx, limits);
    let m = sandbox.describe().await.expect("describe");
    let policy = Policy::new(
        &PolicyConfig::default(),
        BotIdentity::new("roomhopper", "roomhopper"),
        Clock::real(),
    )
    .expect("policy");
    let membership = Membership::new(rooms.iter().map(|r| r.to_string()));
    BotCore::new(sandbox, policy, m, Arc::new(History::new(50)), membership)
}

async fn ask(core: &mut BotCore, text: &str, ts: u64) -> (Vec<String>, usize) {
    let msg = ChatMessage {
        room: "lobby".into(),
        from: "ada".into(),
        text: text.into(),
        timestamp_ms: ts,
    };
    let (_verdict, effects) = core.handle(&msg).await;
    let joined = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Join(r) => Some(r.as_str().to_string()),
            _ => None,
        })
        .collect();
    let refused = effects
        .iter()
        .filter(|e| matches!(e, Effect::Refused { .. }))
        .count();
    (joined, refused)
}

#[tokio::test(start_paused = true)]
async fn joins_are_held_to_four_a_minute_by_default() {
    let mut core = hopper(Limits::default(), &["lobby"]).await;
    // 16 joins in one message: 4 go through, 12 are refused and counted.
    let (joined, refused) = ask(&mut core, "hop 16", 1).await;
    assert_eq!(joined.len(), 4);
    assert_eq!(refused, 12);
    assert_eq!(core.counters().joins_refused, 12);
    // Half a minute later: still spent, leaves included.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(ask(&mut core, "hop 2", 2).await, (vec![], 2));
    assert_eq!(ask(&mut core, "leave lobby", 3).await.1, 1);
    // A minute after the first joins the window has slid.
    tokio::time::advance(Duration::from_secs(31)).await;
    let (joined, refused) = ask(&mut core, "hop 6", 4).await;
    assert_eq!((joined.len(), refused), (4, 2));
    assert_eq!(core.counters().joins_refused, 12 + 2 + 1 + 2);
    assert_eq!(
        core.counters().actions_refused,
        core.counters().joins_refused
    );
}

#[tokio::test(start_paused = true)]
async fn the_room_count_and_the_rate_are_configurable() {
    let limits = Limits {
        joins_per_minute: 10,
        max_rooms: 3,
        ..Limits::default()
    };
    // In `lobby` already: two more rooms fit in this one message, the third does not.
    let mut core = hopper(limits, &["lobby"]).await;
    let (joined, refused) = ask(&mut core, "hop 5", 1).await;
    assert_eq!(joined, ["hop-1-0", "hop-1-1"]);
    assert_eq!(refused, 3);
    // Leaving makes room; the rate (10) is not what refused them.
    assert_eq!(ask(&mut core, "leave lobby", 2).await.1, 0);
}
