//! Handlers of the session and track endpoints (calls-api.md §4.1–4.6).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use opencalls_api::*;
use opencalls_sfu::{
    Command, ItemError, Kind, PublishItem, Published, PullItem, PushItem, SessionKey, UpdateItem,
};

use super::{authorize, read_json, ApiError};
use crate::control::Control;
use crate::registry::{Lookup, PublicationEntry, SessionEntry};

/// Longest mid str0m can hold.
const MAX_MID_LEN: usize = 16;

type ApiResult<T> = Result<T, ApiError>;

/// Auth, then the session of this app.
fn open_session(
    control: &Control,
    app_id: &str,
    session_id: &str,
    headers: &HeaderMap,
) -> ApiResult<SessionEntry> {
    authorize(control, app_id, headers)?;
    match control
        .registry()
        .admit(app_id, session_id, std::time::Instant::now())
    {
        Lookup::Open(e) => Ok(e),
        Lookup::Closed => Err(ApiError::session_gone()),
        Lookup::Unknown => Err(ApiError::not_found("session")),
        Lookup::Limited => Err(ApiError::rate_limited()),
    }
}

/// A JSON body that must be present.
async fn required_json<T: serde::de::DeserializeOwned>(body: Body) -> ApiResult<T> {
    read_json(body)
        .await?
        .ok_or_else(|| ApiError::decoding("empty body"))
}

/// `tracks/close` and `tracks/update` take 1 to 64 items.
fn check_track_count(n: usize) -> ApiResult<()> {
    if n == 0 || n > MAX_TRACKS_PER_REQUEST {
        return Err(ApiError::invalid_params(format!(
            "Expecting 1 to {MAX_TRACKS_PER_REQUEST} tracks in the request"
        )));
    }
    Ok(())
}

/// Makes publications pullable by other sessions of the app.
fn register(control: &Control, session_id: &str, worker: usize, published: &[Published]) {
    let mut reg = control.registry();
    for p in published {
        reg.publish(
            session_id,
            &p.track_name,
            PublicationEntry {
                key: p.key,
                worker,
                kind: p.kind,
            },
        );
    }
}

fn offer_sdp(desc: &SessionDescription) -> ApiResult<&str> {
    match desc.kind {
        SdpType::Offer => Ok(&desc.sdp),
        SdpType::Answer => Err(ApiError::invalid_sdp(
            "expected a session description of type offer",
        )),
    }
}

fn offer(sdp: String) -> SessionDescription {
    SessionDescription {
        kind: SdpType::Offer,
        sdp,
    }
}

fn answer(sdp: String) -> SessionDescription {
    SessionDescription {
        kind: SdpType::Answer,
        sdp,
    }
}

/// `POST sessions/new`.
pub async fn new_session(
    State(control): State<Arc<Control>>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    authorize(&control, &app_id, &headers)?;
    let req: NewSessionRequest = read_json(body).await?.unwrap_or_default();
    let offer = match &req.session_description {
        Some(d) => Some(offer_sdp(d)?.to_string()),
        None => None,
    };
    let worker = control.place()?;
    let peer = control.build_peer(worker)?;
    let session_id = opencalls_sfu::random_hex(32);
    let key = SessionKey::next();
    control.registry().insert_session(
        session_id.clone(),
        SessionEntry {
            app: app_id,
            key,
            worker: worker.index(),
            closed: None,
            tokens: crate::registry::REQUESTS_PER_SECOND,
            refilled: None,
        },
    );
    let sid = session_id.clone();
    let answer_sdp = control
        .call(worker.index(), |reply| Command::AddSession {
            key,
            session_id: sid,
            peer: Box::new(peer),
            offer,
            reply,
        })
        .await??;
    Ok((
        StatusCode::CREATED,
        Json(NewSessionResponse {
            session_id,
            session_description: answer_sdp.map(answer),
        }),
    ))
}

/// `POST sessions/{id}/tracks/new`.
pub async fn new_tracks(
    State(control): State<Arc<Control>>,
    Path((app_id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<TracksResponse>> {
    let session = open_session(&control, &app_id, &session_id, &headers)?;
    let req: TracksRequest = required_json(body).await?;
    let tracks = req.tracks.unwrap_or_default();
    if tracks.len() > MAX_TRACKS_PER_REQUEST {
        return Err(ApiError::invalid_params(format!(
            "Expecting at most {MAX_TRACKS_PER_REQUEST} tracks in the request"
        )));
    }
    let auto = req.auto_discover.unwrap_or(false);
    let remote = tracks
        .iter()
        .filter(|t| t.location == Some(Location::Remote))
        .count();
    if remote > 0 && remote < tracks.len() {
        return Err(ApiError::invalid_params(
            "a batch must be all local or all remote tracks",
        ));
    }
    match (req.session_description, remote > 0) {
        (Some(desc), false) => {
            let sdp = offer_sdp(&desc)?.to_string();
            push(&control, &session, &session_id, sdp, tracks, auto).await
        }
        (None, true) => pull(&control, &app_id, &session, tracks).await,
        (Some(_), true) => Err(ApiError::invalid_params(
            "pulling remote tracks with a client offer is not supported; send no offer",
        )),
        (None, false) if tracks.is_empty() => Err(ApiError::invalid_params(
            "nothing to do: send an offer with local tracks or autoDiscover, or remote tracks",
        )),
        (None, false) => publish_without_offer(&control, &session, tracks).await,
    }
}

async fn push(
    control: &Control,
    session: &SessionEntry,
    session_id: &str,
    sdp: String,
    tracks: Vec<TrackObject>,
    auto_discover: bool,
) -> ApiResult<Json<TracksResponse>> {
    let mut items = Vec::with_capacity(tracks.len());
    for t in tracks {
        let (Some(mid), Some(track_name)) = (t.mid, t.track_name) else {
            return Err(ApiError::invalid_params(
                "local tracks need mid and trackName",
            ));
        };
        if mid.is_empty() || mid.len() > MAX_MID_LEN || track_name.is_empty() {
            return Err(ApiError::invalid_params(format!(
                "mid must be 1 to {MAX_MID_LEN} characters and trackName not empty"
            )));
        }
        items.push(PushItem { mid, track_name });
    }
    let key = session.key;
    let outcome = control
        .call(session.worker, |reply| Command::Push {
            key,
            offer: sdp,
            items,
            auto_discover,
            reply,
        })
        .await??;
    let published: Vec<Published> = outcome
        .tracks
        .iter()
        .filter_map(|t| t.as_ref().ok().cloned())
        .collect();
    register(control, session_id, session.worker, &published);
    let results = outcome
        .tracks
        .into_iter()
        .map(|t| match t {
            Ok(p) => TrackResult {
                mid: Some(p.mid),
                track_name: Some(p.track_name),
                ..Default::default()
            },
            Err((track_name, e)) => item_error(
                TrackResult {
                    track_name: Some(track_name),
                    ..Default::default()
                },
                e,
            ),
        })
        .collect();
    Ok(Json(TracksResponse {
        requires_immediate_renegotiation: false,
        session_description: Some(answer(outcome.answer)),
        tracks: results,
    }))
}

/// Local tracks with no client offer: the SFU offers one m-line per track (recvonly, or
/// sendrecv with `bidirectionalMediaStream`); they are published when the answer arrives.
async fn publish_without_offer(
    control: &Control,
    session: &SessionEntry,
    tracks: Vec<TrackObject>,
) -> ApiResult<Json<TracksResponse>> {
    let mut items = Vec::with_capacity(tracks.len());
    for t in &tracks {
        let kind = match t.kind.as_deref() {
            Some("audio") => Kind::Audio,
            Some("video") => Kind::Video,
            _ => {
                return Err(ApiError::invalid_params(
                    "a local track without a client offer needs kind \"audio\" or \"video\"",
                ))
            }
        };
        let Some(track_name) = t.track_name.clone().filter(|n| !n.is_empty()) else {
            return Err(ApiError::invalid_params("local tracks need a trackName"));
        };
        items.push(PublishItem {
            track_name,
            kind,
            bidirectional: t.bidirectional_media_stream.unwrap_or(false),
        });
    }
    let key = session.key;
    let outcome = control
        .call(session.worker, |reply| Command::Publish {
            key,
            items,
            reply,
        })
        .await??;
    let results = tracks
        .into_iter()
        .zip(outcome.mids)
        .map(|(t, mid)| {
            let base = TrackResult {
                track_name: t.track_name,
                ..Default::default()
            };
            match mid {
                Ok(mid) => TrackResult {
                    mid: Some(mid),
                    ..base
                },
                Err(e) => item_error(base, e),
            }
        })
        .collect();
    Ok(Json(TracksResponse {
        requires_immediate_renegotiation: outcome.offer.is_some(),
        session_description: outcome.offer.map(offer),
        tracks: results,
    }))
}

async fn pull(
    control: &Control,
    app_id: &str,
    session: &SessionEntry,
    tracks: Vec<TrackObject>,
) -> ApiResult<Json<TracksResponse>> {
    let mut items = Vec::with_capacity(tracks.len());
    {
        let reg = control.registry();
        for t in &tracks {
            let (Some(sid), Some(name)) = (&t.session_id, &t.track_name) else {
                return Err(ApiError::invalid_params(
                    "remote tracks need sessionId and trackName",
                ));
            };
            items.push(match reg.publication(app_id, sid, name) {
                Some(p) => Ok(PullItem {
                    source: p.key,
                    source_worker: p.worker,
                    kind: p.kind,
                    source_session_id: sid.clone(),
                    track_name: name.clone(),
                    preferred_rid: t.simulcast.as_ref().and_then(|s| s.preferred_rid.clone()),
                    // `mid: "#name"`: send on the sendrecv m-line of local track `name`.
                    onto: t
                        .mid
                        .as_deref()
                        .and_then(|m| m.strip_prefix('#'))
                        .map(String::from),
                }),
                None => Err(ItemError::TrackNotFound),
            });
        }
    }
    let key = session.key;
    let outcome = control
        .call(session.worker, |reply| Command::Pull { key, items, reply })
        .await??;
    let results = tracks
        .into_iter()
        .zip(outcome.mids)
        .map(|(t, mid)| {
            let base = TrackResult {
                session_id: t.session_id,
                track_name: t.track_name,
                simulcast: t.simulcast,
                ..Default::default()
            };
            match mid {
                Ok(mid) => TrackResult {
                    mid: Some(mid),
                    ..base
                },
                Err(e) => item_error(
                    TrackResult {
                        mid: Some(String::new()),
                        ..base
                    },
                    e,
                ),
            }
        })
        .collect();
    Ok(Json(TracksResponse {
        requires_immediate_renegotiation: outcome.offer.is_some(),
        session_description: outcome.offer.map(offer),
        tracks: results,
    }))
}

fn item_error(r: TrackResult, e: ItemError) -> TrackResult {
    match e {
        ItemError::TrackNotFound => r.with_error(
            ErrorCode::NotFoundTrackError,
            "Track not found: the session has no published track of that name",
        ),
        ItemError::MidNotFound(mid) => r.with_error(
            ErrorCode::InvalidParams,
            format!("mid {mid} is not an m-line this session receives on"),
        ),
        ItemError::RepeatedTrackName => r.with_error(
            ErrorCode::RepeatedLocalTrackError,
            "trackName is already published from another mid of this session",
        ),
        ItemError::NotUpdatable(why) => r.with_error(ErrorCode::UpdateTrackError, why),
        ItemError::AlreadyClosed => {
            r.with_error(ErrorCode::CloseTrackError, CLOSE_TRACK_DESCRIPTION)
        }
        ItemError::Internal => r.with_error(ErrorCode::InternalError, BACKEND_ERROR_DESCRIPTION),
    }
}

/// `PUT sessions/{id}/renegotiate`.
pub async fn renegotiate(
    State(control): State<Arc<Control>>,
    Path((app_id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let session = open_session(&control, &app_id, &session_id, &headers)?;
    let req: RenegotiateRequest = required_json(body).await?;
    if req.session_description.kind != SdpType::Answer {
        return Err(ApiError::invalid_sdp(
            "renegotiate takes the answer to the SFU's offer",
        ));
    }
    let key = session.key;
    let sdp = req.session_description.sdp;
    let published = control
        .call(session.worker, |reply| Command::Answer { key, sdp, reply })
        .await??;
    register(&control, &session_id, session.worker, &published);
    Ok(Json(serde_json::json!({})))
}

/// `PUT sessions/{id}/tracks/close`.
pub async fn close_tracks(
    State(control): State<Arc<Control>>,
    Path((app_id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<TracksResponse>> {
    let session = open_session(&control, &app_id, &session_id, &headers)?;
    let req: CloseTracksRequest = required_json(body).await?;
    check_track_count(req.tracks.len())?;
    let offer = match (&req.session_description, req.force) {
        (Some(d), false) => Some(offer_sdp(d)?.to_string()),
        _ => None,
    };
    let mids: Vec<String> = req.tracks.iter().map(|t| t.mid.clone()).collect();
    let key = session.key;
    let outcome = control
        .call(session.worker, |reply| Command::Close {
            key,
            mids: mids.clone(),
            offer,
            reply,
        })
        .await??;
    {
        let mut reg = control.registry();
        for name in &outcome.unpublished {
            reg.unpublish(&session_id, name);
        }
    }
    let tracks = mids
        .into_iter()
        .zip(outcome.results)
        .map(|(mid, r)| {
            let base = TrackResult {
                mid: Some(mid),
                ..Default::default()
            };
            match r {
                Ok(()) => base,
                Err(e) => item_error(base, e),
            }
        })
        .collect();
    Ok(Json(TracksResponse {
        requires_immediate_renegotiation: false,
        session_description: outcome.answer.map(answer),
        tracks,
    }))
}

/// `PUT sessions/{id}/tracks/update`: re-point pulled m-lines to other publications and/or
/// change their simulcast layer, without SDP.
pub async fn update_tracks(
    State(control): State<Arc<Control>>,
    Path((app_id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<TracksResponse>> {
    let session = open_session(&control, &app_id, &session_id, &headers)?;
    let req: UpdateTracksRequest = required_json(body).await?;
    check_track_count(req.tracks.len())?;
    let mut items = Vec::with_capacity(req.tracks.len());
    {
        let reg = control.registry();
        for t in &req.tracks {
            let Some(mid) = t
                .mid
                .clone()
                .filter(|m| !m.is_empty() && m.len() <= MAX_MID_LEN)
            else {
                return Err(ApiError::invalid_params(
                    "every track needs the mid of a pulled track",
                ));
            };
            let source = match (&t.session_id, &t.track_name) {
                (Some(sid), Some(name)) => match reg.publication(&app_id, sid, name) {
                    Some(p) => Some(PullItem {
                        source: p.key,
                        source_worker: p.worker,
                        kind: p.kind,
                        source_session_id: sid.clone(),
                        track_name: name.clone(),
                        preferred_rid: None,
                        onto: None,
                    }),
                    None => {
                        items.push(Err(ItemError::TrackNotFound));
                        continue;
                    }
                },
                _ => None,
            };
            let preferred_rid = t.simulcast.as_ref().and_then(|s| s.preferred_rid.clone());
            items.push(Ok(UpdateItem {
                mid,
                source,
                preferred_rid,
            }));
        }
    }
    let key = session.key;
    let results = control
        .call(session.worker, |reply| Command::Update {
            key,
            items,
            reply,
        })
        .await??;
    let tracks = req
        .tracks
        .into_iter()
        .zip(results)
        .map(|(t, r)| {
            let base = TrackResult {
                mid: t.mid,
                ..Default::default()
            };
            match r {
                Ok(u) => TrackResult {
                    session_id: Some(u.source_session_id),
                    track_name: Some(u.track_name),
                    ..base
                },
                Err(e) => item_error(
                    TrackResult {
                        session_id: t.session_id,
                        track_name: t.track_name,
                        ..base
                    },
                    e,
                ),
            }
        })
        .collect();
    Ok(Json(TracksResponse {
        requires_immediate_renegotiation: false,
        session_description: None,
        tracks,
    }))
}

/// `GET sessions/{id}`.
pub async fn get_session(
    State(control): State<Arc<Control>>,
    Path((app_id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<GetSessionStateResponse>> {
    let session = open_session(&control, &app_id, &session_id, &headers)?;
    let key = session.key;
    let states = control
        .call(session.worker, |reply| Command::Get { key, reply })
        .await??;
    let tracks = states
        .into_iter()
        .map(|t| TrackResult {
            location: Some(if t.local {
                Location::Local
            } else {
                Location::Remote
            }),
            mid: Some(t.mid),
            session_id: t.source_session_id,
            track_name: Some(t.track_name),
            status: Some(if t.active { "active" } else { "inactive" }),
            ..Default::default()
        })
        .collect();
    Ok(Json(GetSessionStateResponse { tracks }))
}
