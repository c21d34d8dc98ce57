//! REST routes and the `/ws` upgrade.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, RawQuery, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use serde_json::Value;

use super::state::{PostError, RegisterError, ServerState};
use super::{HistoryFault, Instance, RestTimestamps};
use crate::protocol::{
    AgentList, ChatMessage, CreateRoomRequest, CreateRoomResponse, ErrorBody, JoinResponse,
    MAX_FRAME_BYTES, RegisterRequest, RegisterResponse, RoomAgentList, RoomList,
    SendMessageRequest, format_rfc3339_ms, parse_timestamp_str,
};

/// Default and maximum `limit` of `GET /api/rooms/:room/messages`.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 20;
pub(crate) const MAX_HISTORY_LIMIT: usize = 50;

#[derive(Clone)]
pub(crate) struct Ctx {
    pub state: ServerState,
    pub inst: Arc<Instance>,
}

pub(crate) fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/api/register", post(register))
        .route("/api/rooms", get(list_rooms).post(create_room))
        .route("/api/rooms/{room}/join", post(join_room))
        .route(
            "/api/rooms/{room}/messages",
            get(get_messages).post(post_message),
        )
        .route("/api/rooms/{room}/agents", get(room_agents))
        .route("/api/agents", get(list_agents))
        .route("/ws", get(ws_upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(ctx.clone(), stall_layer))
        .with_state(ctx)
}

/// An error answer: `{"error", "code"}` with a status.
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>, code: &str) -> Self {
        Self {
            status,
            body: ErrorBody::new(error, code),
        }
    }

    fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, "bad_request")
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
            "unauthorized",
        )
    }

    fn no_room(room: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no room #{room}"),
            "not_found",
        )
    }
}

impl From<PostError> for ApiError {
    fn from(e: PostError) -> Self {
        match e {
            PostError::NoSuchRoom => Self::new(StatusCode::NOT_FOUND, e.to_string(), "not_found"),
            PostError::InvalidRoom(_) => {
                Self::new(StatusCode::BAD_REQUEST, e.to_string(), "bad_room")
            }
            PostError::EmptyText | PostError::TextTooLong(_) => {
                Self::new(StatusCode::BAD_REQUEST, e.to_string(), "bad_text")
            }
            _ => Self::new(StatusCode::BAD_REQUEST, e.to_string(), "bad_request"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.status, self.body.encode())
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

type ApiResult = Result<Response, ApiError>;

/// Stall fault: nothing is processed until the stall ends.
async fn stall_layer(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let mut rx = ctx.inst.stall.subscribe();
    super::ws::wait_unstalled(&mut rx).await;
    next.run(req).await
}

fn auth(ctx: &Ctx, headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|key| ctx.state.agent_for_key(key.trim()))
        .ok_or_else(ApiError::unauthorized)
}

fn body_str(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))
}

/// Takes one from a fault counter if it is positive.
fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

const OUTAGE_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>503 Service Temporarily Unavailable</title>\
<style>body{font-family:sans-serif;margin:4em}</style></head>\n<body><h1>503 Service Temporarily Unavailable</h1>\n\
<p>The server is temporarily unable to service your request due to maintenance downtime or capacity problems. \
Please try again later.</p>\n<hr><address>nginx</address>\n\
<!-- a padding comment so that clients that print whole bodies are easy to spot: \
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx \
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx -->\n\
</body></html>\n";

/// A proxy's HTML error page with `status` (its title names the status).
fn outage_page(status: StatusCode) -> Response {
    let page = if status == StatusCode::SERVICE_UNAVAILABLE {
        OUTAGE_PAGE.to_owned()
    } else {
        let title = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        OUTAGE_PAGE.replace("503 Service Temporarily Unavailable", &title)
    };
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        page,
    )
        .into_response()
}

/// 429 with `Retry-After` (whole seconds) and `{"error", "code", "retry_after"}`.
fn rate_limited(retry_after: std::time::Duration) -> Response {
    let secs = super::retry_after_secs(retry_after);
    let body = serde_json::json!({
        "error": format!("rate limited: slow down, retry in {secs} s"),
        "code": "rate_limited",
        "retry_after": secs,
    });
    let mut resp = json(StatusCode::TOO_MANY_REQUESTS, body.to_string());
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// The answer of a history request under [`Faults::fail_history`](super::Faults::fail_history).
fn history_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.as_u16() {
        502..=504 => outage_page(status),
        403 => ApiError::new(status, "not allowed to read this room", "forbidden").into_response(),
        429 => ApiError::new(status, "rate limited", "rate_limited").into_response(),
        500..=599 => ApiError::new(status, "internal server error", "server_error").into_response(),
        _ => ApiError::new(status, "history unavailable", "error").into_response(),
    }
}

/// A message as REST carries it, with the timestamp in the server's current format.
fn rest_message(m: &ChatMessage, format: RestTimestamps) -> Value {
    let mut v = m.to_frame_value();
    let ts = match format {
        RestTimestamps::Millis => return v,
        RestTimestamps::Seconds => Value::from(m.timestamp_ms / 1000),
        RestTimestamps::Iso8601 => Value::from(format_rfc3339_ms(m.timestamp_ms)),
    };
    v["timestamp"] = ts;
    v
}

async fn register(State(ctx): State<Ctx>, body: Bytes) -> ApiResult {
    if take_one(&ctx.inst.fail_503) {
        return Ok(outage_page(StatusCode::SERVICE_UNAVAILABLE));
    }
    let req = RegisterRequest::decode(body_str(&body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if take_one(&ctx.inst.fail_409) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "name already taken",
            "name_taken",
        ));
    }
    match ctx.state.register(&req.name, &req.description) {
        Ok(reg) => Ok(json(
            StatusCode::CREATED,
            RegisterResponse {
                key: reg.key,
                agent_id: Some(reg.agent_id),
                name: Some(reg.name),
            }
            .encode(),
        )),
        Err(RegisterError::NameTaken) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "name already taken",
            "name_taken",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "invalid_name",
        )),
    }
}

async fn list_rooms(State(ctx): State<Ctx>, headers: HeaderMap) -> ApiResult {
    auth(&ctx, &headers)?;
    let list = RoomList(ctx.state.rooms());
    Ok(json(
        StatusCode::OK,
        list.encode(ctx.state.config().room_list_shape),
    ))
}

async fn create_room(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth(&ctx, &headers)?;
    let req = CreateRoomRequest::decode(body_str(&body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let created = ctx.state.create_room(&req.name, &req.description)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        CreateRoomResponse {
            name: req.name,
            created,
        }
        .encode(),
    ))
}

async fn join_room(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> ApiResult {
    let agent = auth(&ctx, &headers)?;
    ctx.state.join_room(&agent, &room)?;
    Ok(json(
        StatusCode::OK,
        JoinResponse { room, joined: true }.encode(),
    ))
}

async fn post_message(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> ApiResult {
    let agent = auth(&ctx, &headers)?;
    let req = SendMessageRequest::decode(body_str(&body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if let Some(retry_after) = ctx.inst.rest_send_limit.take() {
        return Ok(rate_limited(retry_after));
    }
    let text = ctx.inst.rewrite(req.text);
    let msg: ChatMessage = ctx.state.post_rest(&agent, &room, &text)?;
    let body = rest_message(&msg, ctx.inst.rest_timestamps());
    Ok(json(StatusCode::CREATED, body.to_string()))
}

async fn get_messages(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    auth(&ctx, &headers)?;
    let mut after = None;
    let mut limit = DEFAULT_HISTORY_LIMIT;
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" if !v.is_empty() => {
                after = Some(
                    parse_timestamp_str(&v)
                        .map_err(|e| ApiError::bad_request(format!("invalid `after`: {e}")))?,
                );
            }
            "limit" if !v.is_empty() => {
                let n: usize = v.trim().parse().map_err(|_| {
                    ApiError::bad_request("invalid `limit`: expected a non-negative integer")
                })?;
                limit = n.min(MAX_HISTORY_LIMIT);
            }
            _ => {}
        }
    }
    let fault = ctx.inst.history.take();
    match fault {
        Some(HistoryFault::Status(status)) => return Ok(history_error(status)),
        Some(HistoryFault::RateLimited(retry_after)) => return Ok(rate_limited(retry_after)),
        Some(HistoryFault::Slow(_)) | None => {}
    }
    let messages = ctx
        .state
        .messages(&room, after, limit)
        .ok_or_else(|| ApiError::no_room(&room))?;
    let format = ctx.inst.rest_timestamps();
    let body = Value::Array(messages.iter().map(|m| rest_message(m, format)).collect());
    if let Some(HistoryFault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    Ok(json(StatusCode::OK, body.to_string()))
}

async fn room_agents(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> ApiResult {
    auth(&ctx, &headers)?;
    let agents = ctx
        .state
        .room_agents(&room)
        .ok_or_else(|| ApiError::no_room(&room))?;
    Ok(json(StatusCode::OK, RoomAgentList(agents).encode()))
}

async fn list_agents(State(ctx): State<Ctx>, headers: HeaderMap) -> ApiResult {
    auth(&ctx, &headers)?;
    Ok(json(StatusCode::OK, AgentList(ctx.state.agents()).encode()))
}

async fn ws_upgrade(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if ctx.inst.rejecting_upgrades() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not accepting connections right now",
            "unavailable",
        )
        .into_response();
    }
    let key = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let Some(agent) = key.and_then(|k| ctx.state.agent_for_key(k.trim())) else {
        return ApiError::unauthorized().into_response();
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    let Ctx { state, inst } = ctx;
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // Thousands of idle bots per server: small buffers that grow only while a
        // large frame is in flight (tungstenite's defaults are 128 KiB each way).
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        .on_upgrade(move |socket| super::ws::accept(state, inst, agent, socket))
}

/// Initial read buffer of one server-side WebSocket.
const WS_BUFFER_BYTES: usize = 4 * 1024;

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", "not_found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
        "method_not_allowed",
    )
}
