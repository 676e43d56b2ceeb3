//! tracks/close: negotiated and forced, for pulled and published tracks; GET reflects it.

use std::time::Duration;

use opencalls_testkit::{pump, ClientPeer};
use serde_json::json;
use str0m::format::Codec;
use str0m::media::MediaKind;

use crate::support::*;

#[test]
fn negotiated_close_of_a_pulled_track_stops_only_that_subscriber() {
    let ts = TestServer::start(2);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Video], "cam");
    let (sb, sc) = (api.new_session(), api.new_session());
    let (mut b, mut c) = (ClientPeer::new(), ClientPeer::new());
    let mb = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    let mc = pull(api, &sc, &mut c, &[(&a.session, &a.names[0])])[0];
    assert!(pump(
        &mut [&mut a.peer, &mut b, &mut c],
        Duration::from_secs(5),
        |p| p.iter().all(|x| x.connected)
    ));
    let pt = a.peer.pt(Codec::Vp8);
    stream(&mut a.peer, &mut [&mut b, &mut c], a.mids[0], pt, 1, 20);
    assert!(b.received_on(mb).len() >= 15 && c.received_on(mc).len() >= 15);

    // B closes its pulled track the way browsers do: stop the transceiver, offer, close.
    let offer = b.offer_stop(&[mb]);
    let r = api.send(
        "PUT",
        &format!("sessions/{sb}/tracks/close"),
        Some(&json!({"tracks": [{"mid": mb.to_string()}], "sessionDescription": {"type": "offer", "sdp": offer}, "force": false})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], false);
    assert_eq!(body["sessionDescription"]["type"], "answer");
    assert_eq!(body["tracks"], json!([{"mid": mb.to_string()}]));
    b.accept_answer(body["sessionDescription"]["sdp"].as_str().unwrap());

    // Let the first packets still in flight land (on a loaded machine the last of them can
    // come after `stream` returns) before counting.
    pump(
        &mut [&mut a.peer, &mut b, &mut c],
        Duration::from_millis(300),
        |_| false,
    );
    let (b_before, c_before) = (b.received.len(), c.received_on(mc).len());
    stream(&mut a.peer, &mut [&mut b, &mut c], a.mids[0], pt, 21, 20);
    assert_eq!(
        b.received.len(),
        b_before,
        "closed subscription receives nothing"
    );
    assert!(
        c.received_on(mc).len() >= c_before + 15,
        "the other subscriber is undisturbed"
    );

    // Closing it again is a per-item close_track_error, HTTP 200.
    let r = api.send(
        "PUT",
        &format!("sessions/{sb}/tracks/close"),
        Some(&json!({"tracks": [{"mid": mb.to_string()}, {"mid": "nope"}], "force": true})),
    );
    assert_eq!(r.status, 200);
    let body = r.json();
    assert!(body.get("sessionDescription").is_none());
    for t in body["tracks"].as_array().unwrap() {
        assert_eq!(t["errorCode"], "close_track_error");
        assert_eq!(
            t["errorDescription"],
            "Track doesn't exist or was already closed"
        );
    }
    // GET shows B's pulled track inactive, C's active.
    let gb = api.send("GET", &format!("sessions/{sb}"), None).json();
    assert_eq!(
        gb["tracks"],
        json!([{"location": "remote", "mid": mb.to_string(), "sessionId": a.session, "trackName": a.names[0], "status": "inactive"}])
    );
    let gc = api.send("GET", &format!("sessions/{sc}"), None).json();
    assert_eq!(gc["tracks"][0]["status"], "active");
}

#[test]
fn closing_a_publication_stops_it_for_subscribers() {
    let ts = TestServer::start(2);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio, MediaKind::Video], "pub");
    let (sb, mut b, mids) = subscribe_connected(api, &mut a, &[0, 1]);
    let opus = a.peer.pt(Codec::Opus);
    stream(&mut a.peer, &mut [&mut b], a.mids[0], opus, 1, 10);
    assert!(b.received_on(mids[0]).len() >= 8);

    // The publisher force-closes its audio track.
    let r = api.send(
        "PUT",
        &format!("sessions/{}/tracks/close", a.session),
        Some(&json!({"tracks": [{"mid": a.mids[0].to_string()}], "force": true})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tracks"], json!([{"mid": a.mids[0].to_string()}]));
    let before = b.received.len();
    stream(&mut a.peer, &mut [&mut b], a.mids[0], opus, 11, 10);
    assert_eq!(
        b.received.len(),
        before,
        "a closed publication forwards nothing"
    );
    // It can no longer be pulled; the video track still can.
    let sc = api.new_session();
    let r = api.send(
        "POST",
        &format!("sessions/{sc}/tracks/new"),
        Some(&json!({"tracks": [
            {"location": "remote", "sessionId": a.session, "trackName": a.names[0]},
            {"location": "remote", "sessionId": a.session, "trackName": a.names[1]}]})),
    );
    let body = r.json();
    assert_eq!(body["tracks"][0]["errorCode"], "not_found_track_error");
    assert!(body["tracks"][1].get("errorCode").is_none());
    let ga = api
        .send("GET", &format!("sessions/{}", a.session), None)
        .json();
    assert_eq!(
        ga["tracks"],
        json!([
            {"location": "local", "mid": a.mids[0].to_string(), "trackName": a.names[0], "status": "inactive"},
            {"location": "local", "mid": a.mids[1].to_string(), "trackName": a.names[1], "status": "active"}
        ])
    );
    let gb = api.send("GET", &format!("sessions/{sb}"), None).json();
    assert_eq!(
        gb["tracks"][0]["status"], "inactive",
        "the subscriber lost its source"
    );
    assert_eq!(gb["tracks"][1]["status"], "active");
}

#[test]
fn repushing_the_same_track_is_idempotent_and_names_are_unique() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio, MediaKind::Audio], "dup");
    // A retry of the same push (same mid, same name) with a fresh offer succeeds.
    let (offer, _) = a.peer.offer_send(&[MediaKind::Audio]);
    let r = api.send(
        "POST",
        &format!("sessions/{}/tracks/new", a.session),
        Some(
            &json!({"sessionDescription": {"type": "offer", "sdp": offer}, "tracks": [
                {"location": "local", "mid": a.mids[0].to_string(), "trackName": a.names[0]},
                {"location": "local", "mid": a.mids[1].to_string(), "trackName": a.names[0]},
                {"location": "local", "mid": "zz", "trackName": "ghost"}
            ]}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert!(body["tracks"][0].get("errorCode").is_none(), "{body}");
    assert_eq!(body["tracks"][1]["errorCode"], "repeated_local_track_error");
    assert!(
        body["tracks"][2]["errorCode"].is_string(),
        "unknown mid is an item error"
    );
    a.peer
        .accept_answer(body["sessionDescription"]["sdp"].as_str().unwrap());
}

#[test]
fn update_repoints_a_pulled_m_line_without_sdp() {
    let ts = TestServer::start(2);
    let api = &ts.api;
    let mut a = publish(
        api,
        &[MediaKind::Video, MediaKind::Video, MediaKind::Audio],
        "cams",
    );
    let sb = api.new_session();
    let mut b = ClientPeer::new();
    let mid = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    assert!(pump(
        &mut [&mut a.peer, &mut b],
        Duration::from_secs(5),
        |p| p[1].connected
    ));
    let pt = a.peer.pt(Codec::Vp8);
    let first = stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 100, 15);

    // Re-point the m-line to the other camera (Calls tracks/update, no renegotiation).
    let r = api.send(
        "PUT",
        &format!("sessions/{sb}/tracks/update"),
        Some(&json!({"tracks": [
            {"location": "remote", "mid": mid.to_string(), "sessionId": a.session, "trackName": a.names[1]},
            {"location": "remote", "mid": "nope", "sessionId": a.session, "trackName": a.names[1]},
            {"location": "remote", "mid": mid.to_string(), "sessionId": a.session, "trackName": "ghost"},
            {"location": "remote", "mid": mid.to_string(), "sessionId": a.session, "trackName": a.names[2]}
        ]})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], false);
    assert!(body.get("sessionDescription").is_none());
    assert_eq!(
        body["tracks"][0],
        json!({"mid": mid.to_string(), "sessionId": a.session, "trackName": a.names[1]})
    );
    assert_eq!(body["tracks"][1]["errorCode"], "update_track_error");
    assert_eq!(body["tracks"][2]["errorCode"], "not_found_track_error");
    assert_eq!(
        body["tracks"][3]["errorCode"], "update_track_error",
        "audio cannot feed a video m-line"
    );

    // The old camera's packets stop; the new one's arrive on the same mid, numbered on.
    let before = b.received_on(mid).len();
    stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 115, 10);
    assert_eq!(
        b.received_on(mid).len(),
        before,
        "old source no longer forwarded"
    );
    let second = stream(&mut a.peer, &mut [&mut b], a.mids[1], pt, 5000, 15);
    pump(
        &mut [&mut a.peer, &mut b],
        Duration::from_millis(500),
        |p| p[1].received_on(mid).len() >= before + 15,
    );
    let got = b.received_on(mid);
    let after: Vec<Vec<u8>> = got[before..].iter().map(|r| r.payload.to_vec()).collect();
    assert!(after.len() >= 12, "new source arrives ({})", after.len());
    assert!(after
        .iter()
        .all(|p| second.contains(p) && !first.contains(p) || second.contains(p)));
    for w in got.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "numbering continues across the switch"
        );
    }
    let g = api.send("GET", &format!("sessions/{sb}"), None).json();
    assert_eq!(g["tracks"][0]["trackName"], a.names[1]);
}
