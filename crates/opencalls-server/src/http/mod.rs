//! The Calls HTTPS API: routing, CORS, auth and body parsing.
//!
//! Boundary: handlers here translate between wire types (`opencalls_api`) and media-plane
//! commands (`opencalls_sfu::Command`); nothing else in the server sees either shape.

mod error;
mod sessions;

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::apps::AuthResult;
use crate::control::Control;

/// Largest request body accepted (64 tracks of SDP fit with room to spare).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The whole HTTP surface.
pub fn router(control: Arc<Control>) -> Router {
    let api = Router::new()
        .route("/sessions/new", post(sessions::new_session))
        .route(
            "/sessions/{session_id}/tracks/new",
            post(sessions::new_tracks),
        )
        .route(
            "/sessions/{session_id}/renegotiate",
            put(sessions::renegotiate),
        )
        .route(
            "/sessions/{session_id}/tracks/close",
            put(sessions::close_tracks),
        )
        .route(
            "/sessions/{session_id}/tracks/update",
            put(sessions::update_tracks),
        )
        .route("/sessions/{session_id}", get(sessions::get_session));
    Router::new()
        .nest("/v1/apps/{app_id}", api.clone())
        .nest("/apps/{app_id}", api)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .with_state(control)
        .layer(middleware::from_fn(cors))
        .layer(middleware::from_fn(log_request))
}

/// One debug line per request (`RUST_LOG=opencalls_server=debug`): method, path, status, time.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = std::time::Instant::now();
    let res = next.run(req).await;
    tracing::debug!(%method, path, status = res.status().as_u16(), us = start.elapsed().as_micros() as u64, "request");
    res
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
}

/// Reads one counter of a worker.
type StatFn = fn(&opencalls_sfu::WorkerStats) -> u64;

/// Prometheus text exposition of the media workers' counters (read with relaxed loads:
/// workers never wait for this).
async fn metrics(axum::extract::State(control): axum::extract::State<Arc<Control>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let counters: [(&str, &str, StatFn); 18] = [
        (
            "opencalls_commands_total",
            "Control commands a media worker handled",
            |s| s.commands.load(Relaxed),
        ),
        (
            "opencalls_command_microseconds_total",
            "Time media workers spent on control commands",
            |s| s.command_us.load(Relaxed),
        ),
        (
            "opencalls_command_microseconds_max",
            "Longest single control command on a media worker",
            |s| s.command_us_max.load(Relaxed),
        ),
        ("opencalls_rx_datagrams_total", "Datagrams received", |s| {
            s.rx_datagrams.load(Relaxed)
        }),
        ("opencalls_tx_datagrams_total", "Datagrams sent", |s| {
            s.tx_datagrams.load(Relaxed)
        }),
        (
            "opencalls_dropped_unknown_total",
            "Datagrams from unvalidated addresses dropped before str0m",
            |s| s.dropped_unknown.load(Relaxed),
        ),
        (
            "opencalls_dropped_invalid_total",
            "Datagrams str0m rejected",
            |s| s.dropped_invalid.load(Relaxed),
        ),
        (
            "opencalls_dropped_send_total",
            "Datagrams the kernel refused",
            |s| s.dropped_send.load(Relaxed),
        ),
        (
            "opencalls_forwarded_rtp_total",
            "RTP packets written to subscribers",
            |s| s.forwarded_rtp.load(Relaxed),
        ),
        (
            "opencalls_egress_rtp_total",
            "Of the RTP packets written to subscribers, those sealed and sent without str0m",
            |s| s.egress_rtp.load(Relaxed),
        ),
        (
            "opencalls_egress_nacked_total",
            "Sequence numbers subscribers' NACKs asked for on the egress path",
            |s| s.egress_nacked.load(Relaxed),
        ),
        (
            "opencalls_egress_rtx_total",
            "Retransmissions (RTX) sent without str0m in answer to subscribers' NACKs",
            |s| s.egress_rtx.load(Relaxed),
        ),
        (
            "opencalls_ingress_nacked_total",
            "Sequence numbers the receive path beside str0m NACKed to publishers",
            |s| s.ingress_nacked.load(Relaxed),
        ),
        (
            "opencalls_ingress_rtx_total",
            "Publishers' retransmissions (RTX) unwrapped into their streams",
            |s| s.ingress_rtx.load(Relaxed),
        ),
        (
            "opencalls_ingress_feedback_total",
            "Transport-cc feedback packets sent to publishers",
            |s| s.ingress_feedback.load(Relaxed),
        ),
        (
            "opencalls_ingress_duplicates_total",
            "Authentic publisher packets not forwarded because they were already delivered",
            |s| s.ingress_duplicates.load(Relaxed),
        ),
        (
            "opencalls_socket_drops_total",
            "Datagrams the kernel dropped at a media worker's sockets, their receive queues full",
            |s| s.receive_drops.load(Relaxed),
        ),
        (
            "opencalls_crashed_sessions_total",
            "Sessions closed after a panic",
            |s| s.crashed_sessions.load(Relaxed),
        ),
    ];
    let workers = control.workers();
    for (name, help, get) in counters {
        per_worker(&mut out, name, "counter", help, workers, get);
    }
    per_worker(
        &mut out,
        "opencalls_sessions",
        "gauge",
        "Sessions on each media worker",
        workers,
        |s| s.sessions.load(Relaxed),
    );
    per_worker(
        &mut out,
        "opencalls_worker_load",
        "gauge",
        "Busy share of each media worker's wall time, smoothed over about a second",
        workers,
        |s| {
            let share =
                f64::from(s.load_permille.load(Relaxed)) / f64::from(opencalls_sfu::load::FULL);
            format!("{share:.3}")
        },
    );
    per_worker(
        &mut out,
        "opencalls_worker_saturated",
        "gauge",
        "1 while a media worker's sockets dropped datagrams within the last second (it takes no new session)",
        workers,
        |s| u8::from(s.saturated.load(Relaxed)),
    );
    let _ = writeln!(
        out,
        "# HELP opencalls_sessions_refused_total sessions/new requests refused because no media worker had room (saturated or at its load limit)\n# TYPE opencalls_sessions_refused_total counter\nopencalls_sessions_refused_total {}",
        control.refused_sessions.load(Relaxed)
    );
    send_delay_histogram(&mut out, control.workers());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// One metric with a line per media worker (`worker` label), its value read by `value`.
fn per_worker<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    workers: &[opencalls_sfu::WorkerHandle],
    value: impl Fn(&opencalls_sfu::WorkerStats) -> V,
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for w in workers {
        let _ = writeln!(
            out,
            "{name}{{worker=\"{}\"}} {}",
            w.index(),
            value(w.stats())
        );
    }
}

/// `opencalls_send_delay_seconds`, a Prometheus histogram per worker (cumulative buckets).
fn send_delay_histogram(out: &mut String, workers: &[opencalls_sfu::WorkerHandle]) {
    use std::fmt::Write;
    let name = "opencalls_send_delay_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a media worker's read of a batch of datagrams to the end of the send that carried what it sent in answer (forwarded RTP above all); the wait in the socket before the read is not in it\n# TYPE {name} histogram"
    );
    for w in workers {
        let h = &w.stats().send_delay;
        let counts = h.counts();
        let mut total = 0;
        for (i, n) in counts.iter().enumerate() {
            total += n;
            let le = match opencalls_sfu::delay::BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{worker=\"{}\",le=\"{le}\"}} {total}",
                w.index()
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{worker=\"{}\"}} {}",
            w.index(),
            h.sum_us() as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{worker=\"{}\"}} {total}", w.index());
    }
}

async fn fallback() -> ApiError {
    ApiError::not_found("path")
}

/// Answers preflights and marks every response readable cross-origin (the Calls demos
/// call the API straight from the browser; proxies forward Origin too, so no allowlist).
async fn cors(req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    if req.method() == Method::OPTIONS {
        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
        );
        let allow_headers = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        add_cors(h, origin);
        return res;
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    add_cors(h, origin);
    // A browser calling the API straight may read when to retry after a 503 for load.
    if h.contains_key(header::RETRY_AFTER) {
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after"),
        );
    }
    res
}

fn add_cors(h: &mut HeaderMap, origin: Option<HeaderValue>) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        origin.unwrap_or_else(|| HeaderValue::from_static("*")),
    );
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// Checks the bearer secret for the app in the path.
pub(crate) fn authorize(
    control: &Control,
    app_id: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match control.apps.authorize(app_id, auth) {
        AuthResult::Allowed => Ok(()),
        AuthResult::UnknownApp => Err(ApiError::not_found("app")),
        AuthResult::BadSecret => Err(ApiError::unauthorized()),
    }
}

/// Reads a JSON body whatever its Content-Type (browsers send text/plain). `None` for an
/// empty body.
pub(crate) async fn read_json<T: DeserializeOwned>(body: Body) -> Result<Option<T>, ApiError> {
    let bytes = to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::payload_too_large())?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::decoding(format!("JSON body validation error: {e}")))
}
