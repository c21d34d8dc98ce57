//! Recovering what was missed while disconnected:
//! `GET /api/rooms/:room/messages?after=TS&limit=50` per room.
//!
//! The reference returns messages newest first and has no `before`, so a full page means
//! older messages in the gap could not be fetched: that is logged. A server that answers
//! oldest first is paged forward with `after` = the newest timestamp seen. Items that fail
//! to decode are skipped and counted, never fatal. Transient failures are retried a few
//! times; 401 and 429 are reported to the supervisor, which re-registers or backs off.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use rand::Rng;
use serde_json::Value;

use super::backoff::Backoff;
use super::http::{Endpoints, MAX_READ_BYTES, error_chain, excerpt, read_limited};
use crate::protocol::{ApiKey, ChatMessage};

/// Why recovery of a room failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("history request rejected the API key (401)")]
    Unauthorized,
    #[error("history request throttled (HTTP {0})")]
    RateLimited(u16),
    #[error("history request failed: {0}")]
    Transient(String),
}

/// What to fetch for one room.
#[derive(Clone, Debug)]
pub struct RoomFetch {
    pub room: String,
    /// Exclusive lower bound, Unix ms.
    pub after_ms: u64,
    /// Everything up to this timestamp is known already; a full newest-first page whose
    /// oldest message is newer than this means a gap that cannot be fetched.
    pub have_until_ms: u64,
}

/// Parameters shared by every room of one recovery.
#[derive(Clone, Debug)]
pub struct FetchParams {
    pub limit: u32,
    pub max_pages: u32,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Backoff,
}

/// The recovered messages of one room, oldest first, and how many items were unreadable.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub room: String,
    pub messages: Vec<ChatMessage>,
    pub skipped: usize,
    /// From when on (Unix ms) the room's history is known complete: the fetch's lower
    /// bound, or the oldest message returned when a full page left a gap before it.
    /// None when the room could not be fetched.
    pub complete_since: Option<u64>,
    /// Why the room could not be fetched (after its retries), if it could not.
    pub failed: Option<String>,
    /// The server throttled the fetch (429).
    pub throttled: bool,
}

/// Fetches every room (concurrently). Only a rejected key (401) fails the whole
/// recovery; a room that cannot be fetched (5xx, 403, 429, an oversized or unreadable
/// answer, after its retries) comes back with `failed` set, so the session can go
/// active anyway and report the gap.
pub async fn recover_all(
    http: reqwest::Client,
    endpoints: Endpoints,
    key: ApiKey,
    rooms: Vec<RoomFetch>,
    params: FetchParams,
    seed: u64,
) -> Result<Vec<Recovered>, FetchError> {
    let futures = rooms.into_iter().enumerate().map(|(i, room)| {
        let (http, endpoints, key, params) = (&http, &endpoints, &key, &params);
        async move {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
                seed.wrapping_add(i as u64),
            );
            match fetch_room(http, endpoints, key, &room, params, &mut rng).await {
                Ok(r) => Ok(r),
                Err(FetchError::Unauthorized) => Err(FetchError::Unauthorized),
                Err(e) => Ok(Recovered {
                    room: room.room.clone(),
                    throttled: matches!(e, FetchError::RateLimited(_)),
                    failed: Some(e.to_string()),
                    ..Recovered::default()
                }),
            }
        }
    });
    futures_util::future::join_all(futures)
        .await
        .into_iter()
        .collect()
}

/// Fetches one room with retries.
pub async fn fetch_room<R: Rng + Send>(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    key: &ApiKey,
    room: &RoomFetch,
    params: &FetchParams,
    rng: &mut R,
) -> Result<Recovered, FetchError> {
    let mut attempt = 0;
    loop {
        match fetch_pages(http, endpoints, key, room, params).await {
            Ok(r) => return Ok(r),
            Err(FetchError::Transient(e)) if attempt < params.retries => {
                let delay = params
                    .retry_backoff
                    .delay(attempt, rng)
                    .unwrap_or(params.retry_backoff.cap);
                tracing::debug!(room = %room.room, error = %e, ?delay, "history fetch failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn fetch_pages(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    key: &ApiKey,
    room: &RoomFetch,
    params: &FetchParams,
) -> Result<Recovered, FetchError> {
    let mut out = Recovered {
        room: room.room.clone(),
        complete_since: Some(room.after_ms),
        ..Recovered::default()
    };
    let mut after = room.after_ms;
    for _ in 0..params.max_pages.max(1) {
        let (mut page, skipped) =
            fetch_page(http, endpoints, key, &room.room, after, params).await?;
        out.skipped += skipped;
        let full = page.len() + skipped >= params.limit as usize;
        let newest_first = page.len() >= 2
            && page.first().map(|m| m.timestamp_ms) > page.last().map(|m| m.timestamp_ms);
        if newest_first {
            page.reverse();
        }
        let newest = page.iter().map(|m| m.timestamp_ms).max();
        let oldest = page.iter().map(|m| m.timestamp_ms).min();
        out.messages.extend(page);
        match (full, newest) {
            (true, Some(newest)) if !newest_first && newest > after => after = newest,
            (true, _) => {
                if let Some(o) = oldest.filter(|o| *o > room.have_until_ms.saturating_add(1)) {
                    out.complete_since = Some(o);
                    tracing::warn!(
                        room = %room.room,
                        after = room.after_ms,
                        limit = params.limit,
                        "history page full: messages missed before the oldest one returned \
                         cannot be recovered"
                    );
                }
                break;
            }
            (false, _) => break,
        }
    }
    // Stable: equal timestamps keep the server's order.
    out.messages.sort_by_key(|m| m.timestamp_ms);
    out.messages
        .retain(|m| m.room == room.room || m.room.is_empty());
    Ok(out)
}

async fn fetch_page(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    key: &ApiKey,
    room: &str,
    after: u64,
    params: &FetchParams,
) -> Result<(Vec<ChatMessage>, usize), FetchError> {
    let resp = http
        .get(endpoints.messages(room, after, params.limit))
        .header("x-api-key", key.expose())
        .timeout(params.timeout)
        .send()
        .await
        .map_err(|e| FetchError::Transient(error_chain(&e)))?;
    let status = resp.status().as_u16();
    let (body, truncated) = read_limited(resp, MAX_READ_BYTES)
        .await
        .map_err(|e| FetchError::Transient(error_chain(&e)))?;
    match status {
        200..=299 => {}
        // Only 401 says the key is rejected; 403 is an error like any other.
        401 => return Err(FetchError::Unauthorized),
        404 => return Ok((Vec::new(), 0)), // the room does not exist (yet): nothing missed
        429 => return Err(FetchError::RateLimited(status)),
        _ => {
            return Err(FetchError::Transient(format!(
                "HTTP {status}: {}",
                excerpt(&body)
            )));
        }
    }
    if truncated {
        return Err(FetchError::Transient(format!(
            "history answer larger than {MAX_READ_BYTES} bytes"
        )));
    }
    decode_lenient(&body).ok_or_else(|| {
        FetchError::Transient(format!(
            "history answer is not a message list: {}",
            excerpt(&body)
        ))
    })
}

/// Member lists fetched lately, by URL, shared by every session of the process: bots
/// of one host in one room ask the server once per half check period, not once each.
static MEMBER_LISTS: LazyLock<Mutex<MemberLists>> = LazyLock::new(Default::default);

/// URL → (when it was fetched, the names it listed).
type MemberLists = HashMap<String, (Instant, Arc<Vec<String>>)>;

/// Connections of this process that check their membership, per server.
static CHECKERS: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);

/// A connection counted among its server's [`CHECKERS`] while it lives.
pub struct Checker {
    base: String,
}

impl Checker {
    pub fn register(endpoints: &Endpoints) -> Checker {
        let base = endpoints.base().to_string();
        *lock(&CHECKERS).entry(base.clone()).or_default() += 1;
        Checker { base }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        let mut checkers = lock(&CHECKERS);
        if let Some(n) = checkers.get_mut(&self.base) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                checkers.remove(&self.base);
            }
        }
    }
}

/// How long a connection to the server at `endpoints` waits between two member-list
/// checks (one room each, a list fetched by another connection of this process less
/// than a period ago reused): `shortest`, or longer when this process's connections
/// to that server would otherwise ask it more than `per_second` times a second. That
/// is at most one request per connection and per room a period, so the bound counts
/// the smaller of the two. `per_second` zero: no bound.
pub fn membership_period(endpoints: &Endpoints, shortest: Duration, per_second: u32) -> Duration {
    if per_second == 0 {
        return shortest;
    }
    let base = endpoints.base();
    let rooms = {
        let mut lists = lock(&MEMBER_LISTS);
        // Rooms nobody asked about lately (left, or their bots gone) stop counting.
        lists.retain(|_, (at, _)| at.elapsed() <= FORGET_MEMBER_LIST);
        lists.keys().filter(|url| url.starts_with(base)).count()
    };
    let connections = lock(&CHECKERS).get(base).copied().unwrap_or(1);
    let askers = rooms.max(1).min(connections.max(1));
    let needed = Duration::from_secs_f64(askers as f64 / f64::from(per_second));
    shortest.max(needed)
}

/// A member list not fetched again for this long no longer counts as a room checked.
const FORGET_MEMBER_LIST: Duration = Duration::from_secs(600);

/// Of `rooms`, those whose member list (`GET /api/rooms/:room/agents`) names none of
/// `names`: the server no longer counts us in them. A room whose list cannot be read
/// (an error, a timeout, an unexpected shape) is not reported: only a list that answers
/// and leaves us out is evidence. A list another session of this process fetched less
/// than `max_age` ago, and after `joined` (when our joins were confirmed: an older list
/// cannot name us yet), is used instead of asking again. The rooms are asked about
/// together.
#[allow(clippy::too_many_arguments)]
pub async fn rooms_missing_us(
    http: reqwest::Client,
    endpoints: Endpoints,
    key: ApiKey,
    rooms: Vec<String>,
    names: Vec<String>,
    timeout: Duration,
    max_age: Duration,
    joined: Instant,
) -> Vec<String> {
    let lists = rooms.iter().map(|room| {
        let url = endpoints.room_agents(room);
        let (http, key) = (&http, &key);
        async move {
            let cached = lock(&MEMBER_LISTS)
                .get(url.as_str())
                .filter(|(at, _)| at.elapsed() <= max_age && *at >= joined)
                .map(|(_, list)| list.clone());
            if cached.is_some() {
                return cached;
            }
            let list = Arc::new(fetch_members(http, url.clone(), key, timeout).await?);
            let mut lists = lock(&MEMBER_LISTS);
            if lists.len() >= 4096 {
                lists.retain(|_, (at, _)| at.elapsed() <= max_age);
            }
            lists.insert(url.into(), (Instant::now(), list.clone()));
            Some(list)
        }
    });
    let lists = futures_util::future::join_all(lists).await;
    rooms
        .into_iter()
        .zip(lists)
        .filter(|(_, list)| {
            list.as_ref()
                .is_some_and(|l| !l.iter().any(|n| names.contains(n)))
        })
        .map(|(room, _)| room)
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The names in one room's member list, or `None` when it cannot be read.
async fn fetch_members(
    http: &reqwest::Client,
    url: url::Url,
    key: &ApiKey,
    timeout: Duration,
) -> Option<Vec<String>> {
    let room = url.path().to_owned();
    let resp = match http
        .get(url)
        .header("x-api-key", key.expose())
        .timeout(timeout)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            tracing::debug!(%room, status = r.status().as_u16(), "member list not readable");
            return None;
        }
        Err(e) => {
            tracing::debug!(%room, error = %error_chain(&e), "member list not readable");
            return None;
        }
    };
    let Ok((body, false)) = read_limited(resp, MAX_READ_BYTES).await else {
        return None;
    };
    let list = crate::protocol::RoomAgentList::decode(&String::from_utf8_lossy(&body)).ok()?;
    Some(list.0.into_iter().map(|a| a.name).collect())
}

/// Decodes a message list (a bare array or `{"messages": [...]}`) item by item; returns
/// the readable messages and how many items were skipped. `None` if it is not a list.
fn decode_lenient(body: &[u8]) -> Option<(Vec<ChatMessage>, usize)> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut map) => match map.remove("messages") {
            Some(Value::Array(items)) => items,
            _ => return None,
        },
        _ => return None,
    };
    let mut out = Vec::with_capacity(items.len());
    let mut skipped = 0;
    for item in items {
        match ChatMessage::decode(&item.to_string()) {
            Ok(m) => out.push(m),
            Err(e) => {
                skipped += 1;
                tracing::debug!(error = %e, "unreadable history item skipped");
            }
        }
    }
    Some((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bots of one process share member lists, but a list fetched before a bot's join
    /// was confirmed cannot name it: it is never taken as a sign the server forgot it.
    #[tokio::test]
    async fn a_member_list_older_than_the_join_is_no_evidence() {
        let server = crate::devserver::spawn(
            "127.0.0.1:0".parse().unwrap(),
            crate::devserver::ServerConfig::default(),
        )
        .await
        .unwrap();
        let state = server.state();
        let late = state.register("late", "").unwrap();
        let endpoints = Endpoints::parse(&server.base_url()).unwrap();
        // Another bot's check cached the list just before "late" joined.
        let url = endpoints.room_agents("lobby");
        let before = Arc::new(vec!["early".to_string()]);
        lock(&MEMBER_LISTS).insert(url.to_string(), (Instant::now(), before));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let joined = Instant::now();
        state.join_room("late", "lobby").unwrap();
        let check = |joined| {
            rooms_missing_us(
                reqwest::Client::new(),
                endpoints.clone(),
                late.key.clone(),
                vec!["lobby".to_string()],
                vec!["late".to_string()],
                Duration::from_secs(5),
                Duration::from_secs(60),
                joined,
            )
        };
        assert!(check(joined).await.is_empty(), "asked the server, listed");
        // Fetched after the join, the list is shared (and says so).
        lock(&MEMBER_LISTS).insert(url.to_string(), (Instant::now(), Arc::new(Vec::new())));
        assert_eq!(check(joined).await, ["lobby"]);
        server.shutdown().await;
    }

    #[test]
    fn member_checks_slow_down_with_the_rooms_and_connections_of_one_server() {
        let busy = Endpoints::parse("http://budget-busy.invalid:1").unwrap();
        let other = Endpoints::parse("http://budget-other.invalid:1").unwrap();
        let short = Duration::from_millis(100);
        assert_eq!(membership_period(&busy, short, 16), short);
        {
            let mut lists = lock(&MEMBER_LISTS);
            for i in 0..40 {
                let url = busy.room_agents(&format!("room-{i}"));
                lists.insert(url.into(), (Instant::now(), Arc::new(Vec::new())));
            }
            // Long unasked: no longer counted.
            if let Some(long_ago) = Instant::now().checked_sub(FORGET_MEMBER_LIST * 2) {
                for i in 0..40 {
                    let url = busy.room_agents(&format!("gone-{i}"));
                    lists.insert(url.into(), (long_ago, Arc::new(Vec::new())));
                }
            }
        }
        // 40 rooms, but one connection asking one room a period: no need to wait.
        assert_eq!(membership_period(&busy, short, 16), short);
        // 8 connections: 8 requests a period at most, 16 a second allowed.
        let eight: Vec<_> = (0..8).map(|_| Checker::register(&busy)).collect();
        assert_eq!(
            membership_period(&busy, short, 16),
            Duration::from_millis(500)
        );
        // 200 connections over the 40 rooms: a list each period per room at most.
        let more: Vec<_> = (0..192).map(|_| Checker::register(&busy)).collect();
        assert_eq!(
            membership_period(&busy, short, 16),
            Duration::from_millis(2500)
        );
        // A longer configured period stays; no bound leaves the configured one.
        let minute = Duration::from_secs(60);
        assert_eq!(membership_period(&busy, minute, 16), minute);
        assert_eq!(membership_period(&busy, short, 0), short);
        // Another server's rooms and connections are its own budget.
        assert_eq!(membership_period(&other, short, 16), short);
        drop((eight, more));
        assert_eq!(membership_period(&busy, short, 16), short);
    }

    #[test]
    fn lenient_decoding() {
        let body = br#"[
            {"type":"message","room":"r","from":"a","text":"new","timestamp":1769790508966},
            {"room":"r","from":"b","text":"no type, seconds","timestamp":1769790508},
            {"room":"r","text":"no sender","timestamp":1},
            42
        ]"#;
        let (msgs, skipped) = decode_lenient(body).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(skipped, 2);
        assert_eq!(msgs[1].timestamp_ms, 1_769_790_508_000);
        let (msgs, _) = decode_lenient(br#"{"messages":[]}"#).unwrap();
        assert!(msgs.is_empty());
        assert!(decode_lenient(b"<html>").is_none());
        assert!(decode_lenient(br#"{"error":"x"}"#).is_none());
    }
}
