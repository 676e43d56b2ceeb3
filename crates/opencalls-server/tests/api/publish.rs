//! Publishing without a client offer (the SFU offers the m-line), and pulling onto an
//! existing bidirectional transceiver with `mid: "#trackName"`.

use std::time::Duration;

use opencalls_testkit::{pump, ClientPeer};
use serde_json::json;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid};

use crate::support::*;

/// Publishes `name` in `session` with no client offer; returns the mid.
fn publish_by_sfu_offer(
    api: &opencalls_testkit::Api,
    session: &str,
    peer: &mut ClientPeer,
    name: &str,
    bidi: bool,
) -> Mid {
    let r = api.send(
        "POST",
        &format!("sessions/{session}/tracks/new"),
        Some(&json!({"tracks": [{"location": "local", "trackName": name, "kind": "audio", "bidirectionalMediaStream": bidi}]})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], true);
    assert_eq!(body["sessionDescription"]["type"], "offer");
    let sdp = body["sessionDescription"]["sdp"].as_str().unwrap();
    assert!(
        sdp.contains(if bidi { "a=sendrecv" } else { "a=recvonly" }),
        "{sdp}"
    );
    assert_eq!(body["tracks"][0]["trackName"], name);
    let mid = Mid::from(body["tracks"][0]["mid"].as_str().unwrap());
    let answer = peer.accept_offer(sdp);
    let r = api.send(
        "PUT",
        &format!("sessions/{session}/renegotiate"),
        Some(&json!({"sessionDescription": {"type": "answer", "sdp": answer}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    mid
}

#[test]
fn push_without_offer_then_pull_it() {
    let ts = TestServer::start(2);
    let api = &ts.api;
    let sa = api.new_session();
    let mut a = ClientPeer::new();
    let mid = publish_by_sfu_offer(api, &sa, &mut a, "sfu-offered", false);
    // Published only once answered: now others can pull it.
    let sb = api.new_session();
    let mut b = ClientPeer::new();
    let got = pull(api, &sb, &mut b, &[(&sa, "sfu-offered")])[0];
    assert!(pump(&mut [&mut a, &mut b], Duration::from_secs(5), |p| p
        [0]
    .connected
        && p[1].connected));
    let pt = a.pt(Codec::Opus);
    let sent = stream(&mut a, &mut [&mut b], mid, pt, 1, 20);
    let rx = b.received_on(got);
    assert!(rx.len() >= 15, "{}", rx.len());
    assert!(rx.iter().all(|r| sent.contains(&r.payload.to_vec())));
    // A second push of the same name is refused.
    let r = api.send(
        "POST",
        &format!("sessions/{sa}/tracks/new"),
        Some(&json!({"tracks": [{"location": "local", "trackName": "sfu-offered", "kind": "audio"}]})),
    );
    assert_eq!(r.status, 406);
    // No kind, no offer: a clear error.
    let r = api.send(
        "POST",
        &format!("sessions/{sa}/tracks/new"),
        Some(&json!({"tracks": [{"location": "local", "trackName": "nokind"}]})),
    );
    assert_eq!(r.status, 406);
    assert_eq!(r.json()["errorCode"], "invalid_params");
}

#[test]
fn pull_onto_a_bidirectional_transceiver() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    // A: one sendrecv audio m-line that publishes "a-mic".
    let sa = api.new_session();
    let mut a = ClientPeer::new();
    let a_mid = publish_by_sfu_offer(api, &sa, &mut a, "a-mic", true);
    // B publishes normally.
    let mut b = publish(api, &[MediaKind::Audio], "b");
    assert!(pump(
        &mut [&mut a, &mut b.peer],
        Duration::from_secs(5),
        |p| p[0].connected
    ));
    // A pulls B's track onto its own "a-mic" transceiver: no new m-line, no renegotiation.
    let r = api.send(
        "POST",
        &format!("sessions/{sa}/tracks/new"),
        Some(&json!({"tracks": [
            {"location": "remote", "sessionId": b.session, "trackName": b.names[0], "mid": "#a-mic"},
            {"location": "remote", "sessionId": b.session, "trackName": b.names[0], "mid": "#nope"}
        ]})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], false);
    assert!(body.get("sessionDescription").is_none());
    assert_eq!(body["tracks"][0]["mid"], a_mid.to_string());
    assert_eq!(body["tracks"][0]["sessionId"], b.session);
    assert!(body["tracks"][1]["errorCode"].is_string());
    let pt = b.peer.pt(Codec::Opus);
    let sent = stream(&mut b.peer, &mut [&mut a], b.mids[0], pt, 1, 20);
    let rx = a.received_on(a_mid);
    assert!(rx.len() >= 15, "A hears B on its own m-line ({})", rx.len());
    assert!(rx.iter().all(|r| sent.contains(&r.payload.to_vec())));
}
