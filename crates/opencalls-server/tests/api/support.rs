//! Starting a server for a test, and the flows every test repeats.

use std::time::Duration;

use opencalls_server::config::ServeConfig;
use opencalls_server::Server;
use opencalls_testkit::{pump, Api, ClientPeer, Received};
use serde_json::{json, Value};
use str0m::media::{MediaKind, Mid};

pub const APP: &str = "0123456789abcdef0123456789abcdef";
pub const SECRET: &str = "test-secret";

/// A server on its own runtime, stopped when dropped.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<Server>,
    pub api: Api,
}

impl TestServer {
    pub fn start(workers: usize) -> TestServer {
        Self::start_with(ServeConfig::for_tests(APP, SECRET, workers))
    }

    pub fn start_with(config: ServeConfig) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt
            .block_on(opencalls_server::start(config))
            .expect("server starts");
        let api = Api {
            addr: server.http_addr,
            app: APP.into(),
            secret: SECRET.into(),
        };
        TestServer {
            rt,
            server: Some(server),
            api,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// A client that published `kinds` in a fresh session, connected.
pub struct Publisher {
    pub session: String,
    /// The server's answer SDP.
    pub answer: String,
    pub peer: ClientPeer,
    pub mids: Vec<Mid>,
    pub names: Vec<String>,
}

pub fn publish(api: &Api, kinds: &[MediaKind], prefix: &str) -> Publisher {
    let session = api.new_session();
    let mut peer = ClientPeer::new();
    let (offer, mids) = peer.offer_send(kinds);
    let names: Vec<String> = (0..kinds.len()).map(|i| format!("{prefix}-{i}")).collect();
    let tracks: Vec<Value> = mids
        .iter()
        .zip(&names)
        .map(|(m, n)| json!({"location": "local", "mid": m.to_string(), "trackName": n}))
        .collect();
    let r = api.send(
        "POST",
        &format!("sessions/{session}/tracks/new"),
        Some(&json!({"sessionDescription": {"type": "offer", "sdp": offer}, "tracks": tracks})),
    );
    assert_eq!(r.status, 200, "push: {}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], false);
    assert_eq!(body["sessionDescription"]["type"], "answer");
    for (i, t) in body["tracks"]
        .as_array()
        .expect("tracks")
        .iter()
        .enumerate()
    {
        assert_eq!(t["mid"], mids[i].to_string());
        assert_eq!(t["trackName"], names[i]);
        assert!(t.get("errorCode").is_none(), "{t}");
    }
    let answer = body["sessionDescription"]["sdp"]
        .as_str()
        .expect("sdp")
        .to_string();
    peer.accept_answer(&answer);
    assert!(
        pump(&mut [&mut peer], Duration::from_secs(5), |p| p[0].connected),
        "publisher connects"
    );
    Publisher {
        session,
        answer,
        peer,
        mids,
        names,
    }
}

/// Pulls tracks into `session` (creating the client's side), returns the mids per track.
pub fn pull(api: &Api, session: &str, peer: &mut ClientPeer, tracks: &[(&str, &str)]) -> Vec<Mid> {
    let items: Vec<Value> = tracks
        .iter()
        .map(|(s, t)| json!({"location": "remote", "sessionId": s, "trackName": t}))
        .collect();
    let r = api.send(
        "POST",
        &format!("sessions/{session}/tracks/new"),
        Some(&json!({ "tracks": items })),
    );
    assert_eq!(r.status, 200, "pull: {}", r.body);
    let body = r.json();
    assert_eq!(body["requiresImmediateRenegotiation"], true, "{body}");
    assert_eq!(body["sessionDescription"]["type"], "offer");
    let mids: Vec<Mid> = body["tracks"]
        .as_array()
        .expect("tracks")
        .iter()
        .zip(tracks)
        .map(|(t, (s, n))| {
            assert_eq!(t["sessionId"], *s);
            assert_eq!(t["trackName"], *n);
            Mid::from(t["mid"].as_str().expect("mid"))
        })
        .collect();
    let answer = peer.accept_offer(body["sessionDescription"]["sdp"].as_str().expect("sdp"));
    let r = api.send(
        "PUT",
        &format!("sessions/{session}/renegotiate"),
        Some(&json!({"sessionDescription": {"type": "answer", "sdp": answer}})),
    );
    assert_eq!(r.status, 200, "renegotiate: {}", r.body);
    assert_eq!(r.json(), json!({}));
    mids
}

/// Sends `count` packets with recognisable payloads from a publisher's m-line, stepping
/// every peer between packets. Returns the payloads sent.
pub fn stream(
    from: &mut ClientPeer,
    others: &mut [&mut ClientPeer],
    mid: Mid,
    pt: u8,
    first_seq: u64,
    count: u64,
) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    for i in 0..count {
        let seq = first_seq + i;
        let payload: Vec<u8> =
            format!("pkt-{seq}-{}", "x".repeat((seq % 50) as usize)).into_bytes();
        assert!(from.send_rtp(mid, pt, seq, (seq * 3000) as u32, &payload));
        sent.push(payload);
        let end = std::time::Instant::now() + Duration::from_millis(5);
        while std::time::Instant::now() < end {
            from.step();
            for o in others.iter_mut() {
                o.step();
            }
        }
    }
    sent
}

/// A fresh session that pulls the publisher's tracks `tracks` (indexes into its names),
/// connected. Returns (session id, client, the pulled mids in order).
pub fn subscribe_connected(
    api: &Api,
    a: &mut Publisher,
    tracks: &[usize],
) -> (String, ClientPeer, Vec<Mid>) {
    let session = api.new_session();
    let mut peer = ClientPeer::new();
    let wanted: Vec<(&str, &str)> = tracks
        .iter()
        .map(|i| (a.session.as_str(), a.names[*i].as_str()))
        .collect();
    let mids = pull(api, &session, &mut peer, &wanted);
    assert!(
        pump(&mut [&mut a.peer, &mut peer], Duration::from_secs(5), |p| p
            [1]
        .connected),
        "subscriber connects"
    );
    (session, peer, mids)
}

/// Packets received in order, none missing, continuously numbered, `ticks` of RTP time
/// apart.
pub fn assert_continuous(got: &[&Received], ticks: u32) {
    for w in got.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "in order, none lost");
        assert_eq!(w[1].rtp_time.wrapping_sub(w[0].rtp_time), ticks);
    }
}
