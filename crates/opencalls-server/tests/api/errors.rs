//! Every request-level and per-item error path answers JSON with the Calls code and status.

use opencalls_server::config::ServeConfig;
use opencalls_testkit::api::raw_request;
use opencalls_testkit::{Api, ClientPeer};
use serde_json::json;
use str0m::media::MediaKind;

use crate::support::*;

fn assert_error(r: &opencalls_testkit::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let b = r.json();
    assert_eq!(b["errorCode"], code, "{b}");
    assert!(b["errorDescription"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    assert!(
        r.header("access-control-allow-origin").is_some(),
        "CORS on errors too"
    );
}

#[test]
fn auth_and_app_isolation() {
    let mut cfg = ServeConfig::for_tests(APP, SECRET, 1);
    cfg.apps.push("otherapp:other-secret".into());
    let ts = TestServer::start_with(cfg);
    let api = &ts.api;
    let other = Api {
        app: "otherapp".into(),
        secret: "other-secret".into(),
        ..api.clone()
    };
    let unknown_app = Api {
        app: "nosuchapp".into(),
        ..api.clone()
    };
    assert_error(
        &unknown_app.send("POST", "sessions/new", None),
        404,
        "not_found",
    );
    let wrong = Api {
        secret: "nope".into(),
        ..api.clone()
    };
    assert_error(
        &wrong.send("POST", "sessions/new", None),
        401,
        "unauthorized",
    );
    let no_auth = raw_request(
        api.addr,
        "POST",
        &format!("/v1/apps/{APP}/sessions/new"),
        &[],
        None,
    );
    assert_error(&no_auth, 401, "unauthorized");
    // Another app's secret does not open this app.
    let cross = Api {
        secret: "other-secret".into(),
        ..api.clone()
    };
    assert_error(
        &cross.send("POST", "sessions/new", None),
        401,
        "unauthorized",
    );

    // A session of one app is invisible to the other: the same answer as an unknown one.
    let mine = api.new_session();
    let theirs = other.send("GET", &format!("sessions/{mine}"), None);
    let unknown = other.send("GET", "sessions/0000000000000000000000000000dead", None);
    assert_error(&theirs, 404, "not_found");
    assert_eq!(theirs.body, unknown.body);
    // ...and its tracks cannot be pulled from the other app.
    let mut a = publish(api, &[MediaKind::Audio], "iso");
    let s2 = other.new_session();
    let r = other.send(
        "POST",
        &format!("sessions/{s2}/tracks/new"),
        Some(&json!({"tracks": [{"location": "remote", "sessionId": a.session, "trackName": a.names[0]}]})),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tracks"][0]["errorCode"], "not_found_track_error");
    a.peer.step();
}

#[test]
fn bodies_that_are_not_calls_json() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let s = api.new_session();
    let path = format!("/v1/apps/{APP}/sessions/{s}/tracks/new");
    let auth = format!("Bearer {SECRET}");
    let h = [("Authorization", auth.as_str())];
    assert_error(
        &raw_request(api.addr, "POST", &path, &h, Some("{bad")),
        400,
        "decoding_error",
    );
    assert_error(
        &raw_request(api.addr, "POST", &path, &h, Some(r#"{"tracks": "nope"}"#)),
        400,
        "decoding_error",
    );
    assert_error(
        &raw_request(
            api.addr,
            "POST",
            &path,
            &h,
            Some(r#"{"sessionDescription": {"type": "pranswer", "sdp": ""}}"#),
        ),
        400,
        "decoding_error",
    );
    assert_error(
        &raw_request(api.addr, "POST", &path, &h, Some("")),
        400,
        "decoding_error",
    );
    // JSON without any content type is fine (as is text/plain, which Api sends).
    let ok = raw_request(
        api.addr,
        "POST",
        &format!("/v1/apps/{APP}/sessions/new?thirdparty=false&correlationId=abc&streamDebug"),
        &h,
        Some("{}"),
    );
    assert_eq!(ok.status, 201, "{}", ok.body);
    // The path without /v1 works too.
    let short = raw_request(
        api.addr,
        "POST",
        &format!("/apps/{APP}/sessions/new?"),
        &h,
        None,
    );
    assert_eq!(short.status, 201, "{}", short.body);
    // Over the size limit.
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(2 << 20));
    assert_error(
        &raw_request(api.addr, "POST", &path, &h, Some(&big)),
        413,
        "payload_too_large",
    );
    // Unknown path: JSON 404.
    assert_error(
        &raw_request(api.addr, "GET", "/v1/nothing/here", &h, None),
        404,
        "not_found",
    );
}

#[test]
fn invalid_sdp_and_negotiation_order() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let s = api.new_session();
    let tracks_new = format!("sessions/{s}/tracks/new");
    for sdp in [
        "",
        "v=0\r\n",
        "not sdp at all",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",
    ] {
        let r = api.send(
            "POST",
            &tracks_new,
            Some(&json!({"sessionDescription": {"type": "offer", "sdp": sdp}, "tracks": [{"location": "local", "mid": "0", "trackName": "t"}]})),
        );
        assert_error(&r, 406, "invalid_session_description");
    }
    // An answer where an offer belongs.
    let r = api.send(
        "POST",
        &tracks_new,
        Some(&json!({"sessionDescription": {"type": "answer", "sdp": "v=0"}, "tracks": [{"location": "local", "mid": "0", "trackName": "t"}]})),
    );
    assert_error(&r, 406, "invalid_session_description");
    // An answer with no SFU offer pending.
    let mut c = ClientPeer::new();
    let (offer, _) = c.offer_send(&[MediaKind::Audio]);
    let r = api.send(
        "PUT",
        &format!("sessions/{s}/renegotiate"),
        Some(&json!({"sessionDescription": {"type": "answer", "sdp": offer}})),
    );
    assert_error(&r, 406, "invalid_session_description");
    // More than 64 tracks.
    let many: Vec<_> = (0..65)
        .map(|i| json!({"location": "remote", "sessionId": s, "trackName": format!("t{i}")}))
        .collect();
    assert_error(
        &api.send("POST", &tracks_new, Some(&json!({ "tracks": many }))),
        406,
        "invalid_params",
    );
    // Mixed local and remote.
    let mixed = json!({"tracks": [{"location": "remote", "sessionId": s, "trackName": "x"}, {"location": "local", "mid": "0", "trackName": "y"}]});
    assert_error(
        &api.send("POST", &tracks_new, Some(&mixed)),
        406,
        "invalid_params",
    );
    // The session still works after all of that.
    assert_eq!(api.send("GET", &format!("sessions/{s}"), None).status, 200);
}

#[test]
fn pull_items_fail_alone_and_offers_serialize() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio, MediaKind::Video], "p");
    let b = api.new_session();
    let tracks_new = format!("sessions/{b}/tracks/new");
    // Every item fails: no offer, nothing to renegotiate.
    let r = api.send(
        "POST",
        &tracks_new,
        Some(&json!({"tracks": [{"location": "remote", "sessionId": a.session, "trackName": "missing"}]})),
    );
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], false);
    assert!(body.get("sessionDescription").is_none());
    assert_eq!(body["tracks"][0]["errorCode"], "not_found_track_error");
    assert_eq!(body["tracks"][0]["mid"], "");
    // One good, one bad: the good one gets an m-line, the bad one an error.
    let r = api.send(
        "POST",
        &tracks_new,
        Some(&json!({"tracks": [
            {"location": "remote", "sessionId": a.session, "trackName": a.names[0]},
            {"location": "remote", "sessionId": "ffffffffffffffffffffffffffffffff", "trackName": a.names[1]}
        ]})),
    );
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], true);
    let sdp = body["sessionDescription"]["sdp"].as_str().unwrap();
    assert_eq!(sdp.matches("m=audio").count(), 1);
    assert_eq!(sdp.matches("m=video").count(), 0);
    assert!(sdp.contains("a=ice-lite"));
    let good = &body["tracks"][0];
    assert_eq!(good["sessionId"], a.session);
    assert!(good["mid"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(good.get("errorCode").is_none());
    assert_eq!(body["tracks"][1]["errorCode"], "not_found_track_error");
    // While that offer is pending, another mutation is refused with 406.
    let again = api.send(
        "POST",
        &tracks_new,
        Some(&json!({"tracks": [{"location": "remote", "sessionId": a.session, "trackName": a.names[1]}]})),
    );
    assert_error(&again, 406, "invalid_session_description");
    a.peer.step();
}

#[test]
fn cors_preflight() {
    let ts = TestServer::start(1);
    let r = raw_request(
        ts.api.addr,
        "OPTIONS",
        &format!("/v1/apps/{APP}/sessions/new"),
        &[
            ("Origin", "http://example.test"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
        None,
    );
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://example.test")
    );
    assert!(r
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));
    assert!(r
        .header("access-control-allow-methods")
        .is_some_and(|h| h.contains("PUT")));
}

#[test]
fn more_than_fifty_requests_a_second_get_429() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let s = api.new_session();
    let other = api.new_session();
    // The bucket starts full: a burst of 50 is never refused, whatever the timing.
    for _ in 0..50 {
        assert_eq!(api.send("GET", &format!("sessions/{s}"), None).status, 200);
    }
    // Keep asking; the refill is 50/s, so a server answering faster than that must refuse
    // some (the logic itself is unit-tested with a virtual clock in registry.rs).
    let limited = (0..1000)
        .map(|_| api.send("GET", &format!("sessions/{s}"), None))
        .find(|r| r.status != 200)
        .expect("a 429 within 1000 back-to-back requests");
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.json()["errorCode"], "retryable_transient_error");
    assert_eq!(
        api.send("GET", &format!("sessions/{other}"), None).status,
        200,
        "per session"
    );
}

#[test]
fn sessions_new_is_refused_with_retry_after_when_no_worker_has_room() {
    // At the default limit an idle worker takes sessions, and /metrics shows its load.
    let ts = TestServer::start(2);
    ts.api.new_session();
    let m = raw_request(ts.api.addr, "GET", "/metrics", &[], None).body;
    for w in ["0", "1"] {
        let line = m
            .lines()
            .find(|l| l.starts_with(&format!("opencalls_worker_load{{worker=\"{w}\"}}")))
            .unwrap_or_else(|| panic!("no load gauge for worker {w}:\n{m}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&v), "{line}");
    }
    assert!(m.contains("\nopencalls_sessions_refused_total 0\n"), "{m}");
    for w in ["0", "1"] {
        assert!(
            m.contains(&format!(
                "\nopencalls_worker_saturated{{worker=\"{w}\"}} 0\n"
            )),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "\nopencalls_socket_drops_total{{worker=\"{w}\"}} 0\n"
            )),
            "{m}"
        );
    }
    drop(ts);

    // A limit of 0 puts every worker at it: new sessions are refused, the API still answers.
    let mut cfg = ServeConfig::for_tests(APP, SECRET, 2);
    cfg.max_worker_load = 0.0;
    let ts = TestServer::start_with(cfg);
    for _ in 0..3 {
        let r = ts.api.send("POST", "sessions/new", None);
        assert_error(&r, 503, "temporarily_unavailable_error");
        assert_eq!(r.header("retry-after"), Some("2"), "{:?}", r.headers);
        assert_eq!(
            r.header("access-control-expose-headers"),
            Some("retry-after")
        );
    }
    let m = raw_request(ts.api.addr, "GET", "/metrics", &[], None).body;
    assert!(m.contains("\nopencalls_sessions_refused_total 3\n"), "{m}");
    let unknown = ts
        .api
        .send("GET", "sessions/0000000000000000000000000000dead", None);
    assert_error(&unknown, 404, "not_found");
}
