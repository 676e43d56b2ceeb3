//! Bad input from anyone on the internet: dropped and counted, never reaching str0m, never
//! disturbing a session.

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opencalls_testkit::{pump, ClientPeer};
use str0m::format::Codec;
use str0m::media::MediaKind;

use crate::support::*;

/// A STUN binding request naming `ufrag`, with a bogus MESSAGE-INTEGRITY.
fn forged_binding_request(ufrag: &str) -> Vec<u8> {
    let username = format!("{ufrag}:attacker");
    let ulen = username.len();
    let padded = ulen.div_ceil(4) * 4;
    let body_len = 4 + padded + 4 + 20;
    let mut b = vec![0x00, 0x01];
    b.extend_from_slice(&(body_len as u16).to_be_bytes());
    b.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    b.extend_from_slice(&[9u8; 12]);
    b.extend_from_slice(&[0x00, 0x06]);
    b.extend_from_slice(&(ulen as u16).to_be_bytes());
    b.extend_from_slice(username.as_bytes());
    b.resize(20 + 4 + padded, 0);
    b.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    b.extend_from_slice(&[0xAB; 20]);
    b
}

#[test]
fn garbage_and_forged_stun_are_dropped_and_sessions_survive() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Video], "victim");
    let (_, mut b, mids) = subscribe_connected(api, &mut a, &[0]);
    let mid = mids[0];

    let worker = &ts.server().control().workers()[0];
    let media_addr = worker.candidates()[0];
    let stats = worker.stats();
    let dropped_before = stats.dropped_unknown.load(Ordering::Relaxed);

    // The victim's ufrag is public (it is in the SDP), its password is not.
    let ufrag = a
        .answer
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .expect("ufrag in the answer")
        .to_string();
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 1],
        vec![0x80, 0x60, 0, 1, 0, 0, 0, 1, 0, 0, 0, 42, 1, 2, 3], // RTP-shaped
        vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 1, 2, 3], // DTLS-shaped
        vec![0u8; 1500],
        forged_binding_request("nosuchufrag"),
    ];
    for d in &junk {
        attacker.send_to(d, media_addr).unwrap();
    }
    // A forged request naming the real ufrag reaches str0m, which does not answer it
    // (bad integrity), so the attacker's address is never learned...
    attacker
        .send_to(&forged_binding_request(&ufrag), media_addr)
        .unwrap();
    let mut buf = [0u8; 1500];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "no answer to a forged request"
    );
    // ...and what it sends next is dropped before str0m.
    attacker.send_to(&junk[3], media_addr).unwrap();
    let expected = junk.len() as u64 + 1;
    assert!(
        pump(&mut [&mut a.peer, &mut b], Duration::from_secs(2), |_| {
            stats.dropped_unknown.load(Ordering::Relaxed) >= dropped_before + expected
        }),
        "every hostile datagram counted as dropped ({} of {expected})",
        stats.dropped_unknown.load(Ordering::Relaxed) - dropped_before
    );
    assert_eq!(stats.crashed_sessions.load(Ordering::Relaxed), 0);

    // The drops are visible to operators.
    let m = opencalls_testkit::api::raw_request(api.addr, "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    let line = m
        .body
        .lines()
        .find(|l| l.starts_with("opencalls_dropped_unknown_total{worker=\"0\"}"))
        .expect("metric present");
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= dropped_before + expected);

    // The victim's media still flows.
    let pt = a.peer.pt(Codec::Vp8);
    stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 1, 20);
    assert!(b.received_on(mid).len() >= 15);
}

#[test]
fn a_panic_in_one_session_closes_only_that_session() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Video], "steady");
    let sb = api.new_session();
    let mut b = ClientPeer::new();
    let mid = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    let mut doomed = publish(api, &[MediaKind::Audio], "doomed");
    assert!(pump(
        &mut [&mut a.peer, &mut b],
        Duration::from_secs(5),
        |p| p[1].connected
    ));

    let control = ts.server().control();
    let key = match control.registry().session(APP, &doomed.session) {
        opencalls_server::registry::Lookup::Open(e) => e.key,
        other => panic!("{other:?}"),
    };
    // The worker survives this.
    std::panic::set_hook(Box::new(|_| {}));
    control
        .worker(0)
        .send(opencalls_sfu::Command::InjectPanic { key });
    let stats = control.worker(0).stats();
    assert!(pump(
        &mut [&mut a.peer, &mut b, &mut doomed.peer],
        Duration::from_secs(3),
        |_| { stats.crashed_sessions.load(Ordering::Relaxed) == 1 }
    ));
    let _ = std::panic::take_hook();
    // Only that session is gone (410); the others keep working.
    let r = api.send("GET", &format!("sessions/{}", doomed.session), None);
    assert_eq!(r.status, 410, "{}", r.body);
    let pt = a.peer.pt(Codec::Vp8);
    stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 1, 20);
    assert!(b.received_on(mid).len() >= 15);
    assert_eq!(api.send("GET", &format!("sessions/{sb}"), None).status, 200);
}
