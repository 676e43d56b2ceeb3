//! The seed's "simple session" lifecycle end to end, and expiry of what nobody closes.

use std::time::Duration;

use opencalls_server::config::ServeConfig;
use opencalls_testkit::{pump, ClientPeer};
use serde_json::json;
use str0m::format::Codec;
use str0m::media::MediaKind;

use crate::support::*;

#[test]
fn simple_session_lifecycle_leaves_others_undisturbed() {
    let ts = TestServer::start(2);
    let api = &ts.api;
    // A bystander pair (D publishes, C listens) runs throughout.
    let mut d = publish(api, &[MediaKind::Audio], "d");
    let sc = api.new_session();
    let mut c = ClientPeer::new();
    let mc = pull(api, &sc, &mut c, &[(&d.session, &d.names[0])])[0];
    // 1-2. A creates a session and publishes audio.
    let mut a = publish(api, &[MediaKind::Audio], "a");
    // 3. B learns of A and pulls its track.
    let sb = api.new_session();
    let mut b = ClientPeer::new();
    let mb = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    assert!(pump(
        &mut [&mut a.peer, &mut b, &mut c, &mut d.peer],
        Duration::from_secs(5),
        |p| p.iter().all(|x| x.connected)
    ));
    let opus = a.peer.pt(Codec::Opus);
    let mut seq_d = 1;
    let mut both = |a: &mut ClientPeer,
                    b: &mut ClientPeer,
                    c: &mut ClientPeer,
                    d: &mut ClientPeer,
                    seq_a: u64| {
        for i in 0..10 {
            a.send_rtp(
                a_mid(a),
                opus,
                seq_a + i,
                ((seq_a + i) * 960) as u32,
                b"a-audio",
            );
            d.send_rtp(a_mid(d), opus, seq_d, (seq_d * 960) as u32, b"d-audio");
            seq_d += 1;
            pump(&mut [a, b, c, d], Duration::from_millis(10), |_| false);
        }
    };
    both(&mut a.peer, &mut b, &mut c, &mut d.peer, 1);
    assert!(
        b.received_on(mb).iter().any(|r| &*r.payload == b"a-audio"),
        "B hears A"
    );
    let c_count = |c: &ClientPeer| c.received_on(mc).len();
    let c0 = c_count(&c);
    assert!(c0 >= 8);

    // 4. B closes its pulled track (negotiated).
    let offer = b.offer_stop(&[mb]);
    let r = api.send(
        "PUT",
        &format!("sessions/{sb}/tracks/close"),
        Some(&json!({"tracks": [{"mid": mb.to_string()}], "sessionDescription": {"type": "offer", "sdp": offer}, "force": false})),
    );
    b.accept_answer(r.json()["sessionDescription"]["sdp"].as_str().unwrap());
    let b1 = b.received.len();
    both(&mut a.peer, &mut b, &mut c, &mut d.peer, 100);
    assert_eq!(b.received.len(), b1);
    // 5. A closes its track and leaves.
    let offer = a.peer.offer_stop(&[a.mids[0]]);
    let r = api.send(
        "PUT",
        &format!("sessions/{}/tracks/close", a.session),
        Some(&json!({"tracks": [{"mid": a.mids[0].to_string()}], "sessionDescription": {"type": "offer", "sdp": offer}, "force": false})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    drop(a);
    // The bystanders never noticed.
    let dm = d.mids[0];
    for i in 0..20u64 {
        d.peer
            .send_rtp(dm, opus, 1000 + i, ((1000 + i) * 960) as u32, b"d-audio");
        pump(
            &mut [&mut b, &mut c, &mut d.peer],
            Duration::from_millis(10),
            |_| false,
        );
    }
    assert!(c_count(&c) >= c0 + 15, "C kept hearing D throughout");
}

fn a_mid(p: &ClientPeer) -> str0m::media::Mid {
    // The first (only) sending m-line of a publisher in these tests.
    p.sending_mids()[0]
}

#[test]
fn unconnected_sessions_and_silent_tracks_expire() {
    let mut cfg = ServeConfig::for_tests(APP, SECRET, 1);
    cfg.idle_timeout_secs = 1;
    let ts = TestServer::start_with(cfg);
    let api = &ts.api;
    // A session that never connects is closed; its id then answers 410.
    let lonely = api.new_session();
    // A publication that never receives media is garbage-collected.
    let mut a = publish(api, &[MediaKind::Audio], "silent");
    pump(&mut [&mut a.peer], Duration::from_millis(2500), |_| false);
    let r = api.send("GET", &format!("sessions/{lonely}"), None);
    assert_eq!(r.status, 410, "{}", r.body);
    assert_eq!(r.json()["errorCode"], "session_error");
    let g = api.send("GET", &format!("sessions/{}", a.session), None);
    assert_eq!(g.status, 200, "a connected session stays");
    assert_eq!(g.json()["tracks"][0]["status"], "inactive");
    let sb = api.new_session();
    let r = api.send(
        "POST",
        &format!("sessions/{sb}/tracks/new"),
        Some(&json!({"tracks": [{"location": "remote", "sessionId": a.session, "trackName": a.names[0]}]})),
    );
    assert_eq!(r.json()["tracks"][0]["errorCode"], "not_found_track_error");
}

#[test]
fn a_new_session_from_an_address_an_old_session_still_holds_connects() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio], "a");
    // B listens from some address, then goes away without closing anything: the server
    // still maps that address to B's session until B's session times out.
    let (_sb, b, _) = subscribe_connected(api, &mut a, &[0]);
    let addr = b.local_addr();
    drop(b);
    // C is a new PeerConnection of a new session from the very same address.
    let sc = api.new_session();
    let mut c = ClientPeer::bound_to(addr);
    let mc = pull(api, &sc, &mut c, &[(&a.session, &a.names[0])])[0];
    assert!(
        pump(&mut [&mut a.peer, &mut c], Duration::from_secs(5), |p| p[1]
            .connected),
        "C connects although B's session still holds the address"
    );
    let opus = a.peer.pt(Codec::Opus);
    let mid = a_mid(&a.peer);
    for seq in 1..=10u64 {
        a.peer.send_rtp(mid, opus, seq, (seq * 960) as u32, b"to-c");
        pump(
            &mut [&mut a.peer, &mut c],
            Duration::from_millis(10),
            |_| false,
        );
    }
    assert!(
        c.received_on(mc).iter().any(|r| &*r.payload == b"to-c"),
        "C gets media"
    );
}
