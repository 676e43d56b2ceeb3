//! The built-in demo: an echo page, a room page, and the small backend a Calls app needs.
//!
//! The backend holds the app secret server-side (the browser never sees it) and calls the
//! Calls API with it, exactly as an app's own backend would: its `/demo/api/calls/…` proxy
//! sends the request, with the Bearer secret added, through the same API router that serves
//! `/v1/apps/…`. Presence (who is in which room, with which tracks) is the app's job in
//! Calls, so the room service lives here too, not in the SFU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use crate::apps::App;
use crate::http::{read_json, ApiError};

/// A participant that has not polled for this long has left.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(10);

struct Demo {
    app: App,
    api: Router,
    rooms: Mutex<HashMap<String, Room>>,
}

#[derive(Default)]
struct Room {
    participants: HashMap<String, Participant>,
}

struct Participant {
    name: String,
    session_id: String,
    tracks: Vec<RoomTrack>,
    last_seen: Instant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomTrack {
    track_name: String,
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinRequest {
    name: String,
    session_id: String,
    tracks: Vec<RoomTrack>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ParticipantView {
    id: String,
    name: String,
    session_id: String,
    tracks: Vec<RoomTrack>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Who {
    participant_id: Option<String>,
}

/// Demo pages and backend for `app`, calling the Calls API through `api`.
pub fn router(app: App, api: Router) -> Router {
    let demo = Arc::new(Demo {
        app,
        api,
        rooms: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/", get(|| async { Html(include_str!("index.html")) }))
        .route(
            "/demo/echo",
            get(|| async { Html(include_str!("echo.html")) }),
        )
        .route(
            "/demo/room",
            get(|| async { Html(include_str!("room.html")) }),
        )
        .route("/demo/calls.js", get(calls_js))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/demo/api/calls/{*path}", any(calls_proxy))
        .route("/demo/api/rooms/{room}", get(room_state))
        .route("/demo/api/rooms/{room}/join", post(join))
        .route("/demo/api/rooms/{room}/leave", post(leave))
        .with_state(demo)
}

async fn calls_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("calls.js"),
    )
}

/// Forwards `/demo/api/calls/<path>` to `/v1/apps/<app>/<path>` with the secret.
async fn calls_proxy(
    State(demo): State<Arc<Demo>>,
    Path(path): Path<String>,
    req: Request,
) -> Response {
    let allowed = path == "sessions/new" || path.starts_with("sessions/");
    if !allowed || !matches!(*req.method(), Method::GET | Method::POST | Method::PUT) {
        return ApiError::not_found("path").into_response();
    }
    let uri = format!("/v1/apps/{}/{}", demo.app.id, path);
    let (parts, body) = req.into_parts();
    let forwarded = Request::builder()
        .method(parts.method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {}", demo.app.secret))
        .body(body);
    let Ok(forwarded) = forwarded else {
        return ApiError::internal().into_response();
    };
    match demo.api.clone().oneshot(forwarded).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

impl Demo {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn join(
    State(demo): State<Arc<Demo>>,
    Path(room): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: JoinRequest = read_json(body)
        .await?
        .ok_or_else(|| ApiError::decoding("empty body"))?;
    let id = opencalls_sfu::random_hex(16);
    let name: String = req.name.chars().take(64).collect();
    demo.rooms().entry(room).or_default().participants.insert(
        id.clone(),
        Participant {
            name,
            session_id: req.session_id,
            tracks: req.tracks,
            last_seen: Instant::now(),
        },
    );
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({ "participantId": id })),
    ))
}

async fn leave(
    State(demo): State<Arc<Demo>>,
    Path(room): Path<String>,
    Query(who): Query<Who>,
) -> Json<serde_json::Value> {
    if let (Some(id), Some(r)) = (who.participant_id, demo.rooms().get_mut(&room)) {
        r.participants.remove(&id);
    }
    Json(serde_json::json!({}))
}

/// Everyone in the room; polling it is also the caller's heartbeat.
async fn room_state(
    State(demo): State<Arc<Demo>>,
    Path(room): Path<String>,
    Query(who): Query<Who>,
) -> Json<serde_json::Value> {
    let now = Instant::now();
    let mut rooms = demo.rooms();
    let r = rooms.entry(room.clone()).or_default();
    if let Some(p) = who
        .participant_id
        .and_then(|id| r.participants.get_mut(&id))
    {
        p.last_seen = now;
    }
    r.participants
        .retain(|_, p| now.saturating_duration_since(p.last_seen) < PRESENCE_TIMEOUT);
    let mut list: Vec<ParticipantView> = r
        .participants
        .iter()
        .map(|(id, p)| ParticipantView {
            id: id.clone(),
            name: p.name.clone(),
            session_id: p.session_id.clone(),
            tracks: p.tracks.clone(),
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    if r.participants.is_empty() {
        rooms.remove(&room);
    }
    Json(serde_json::json!({ "participants": list }))
}
