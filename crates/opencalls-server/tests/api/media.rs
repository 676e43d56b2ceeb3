//! Push → pull → media: what arrives is what was published, continuously numbered.

use std::time::Duration;

use opencalls_server::config::{IngressArg, ServeConfig};
use opencalls_testkit::{pump, Api, ClientPeer};
use str0m::format::Codec;
use str0m::media::MediaKind;

use crate::support::*;

fn push_pull_forwards(workers: usize) {
    let ts = TestServer::start(workers);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio, MediaKind::Video], "a");
    let b_session = api.new_session();
    let mut b = ClientPeer::new();
    let mids = pull(api, &b_session, &mut b, &[(&a.session, &a.names[1])]);
    let per_worker: Vec<usize> = ts
        .server()
        .control()
        .workers()
        .iter()
        .map(|w| {
            w.stats()
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .collect();
    if workers == 2 {
        assert_eq!(
            per_worker,
            vec![1, 1],
            "publisher and subscriber on different workers"
        );
    }
    assert!(
        pump(&mut [&mut a.peer, &mut b], Duration::from_secs(5), |p| p[1]
            .connected),
        "subscriber connects"
    );
    // A new subscriber makes the SFU ask the publisher for a keyframe.
    assert!(
        pump(&mut [&mut a.peer, &mut b], Duration::from_secs(3), |p| {
            p[0].keyframe_requests.contains(&a.mids[1])
        }),
        "publisher gets a keyframe request when the subscriber attaches"
    );

    let pt = a.peer.pt(Codec::Vp8);
    let sent = stream(&mut a.peer, &mut [&mut b], a.mids[1], pt, 65_000, 60);
    pump(
        &mut [&mut a.peer, &mut b],
        Duration::from_millis(500),
        |p| p[1].received.len() >= sent.len(),
    );
    let got = b.received_on(mids[0]);
    assert!(got.len() >= 55, "received {} of {}", got.len(), sent.len());
    // Payload bytes are forwarded untouched and in order.
    let payloads: Vec<Vec<u8>> = got.iter().map(|r| r.payload.to_vec()).collect();
    let first = sent
        .iter()
        .position(|p| *p == payloads[0])
        .expect("first payload was sent");
    for (i, p) in payloads.iter().enumerate() {
        assert_eq!(p, &sent[first + i], "payload {i}");
    }
    // Sequence numbers are continuous for the subscriber, across the publisher's 16-bit wrap.
    assert_continuous(&got, 3000);
    // The subscriber's m-line carries the publisher's codec.
    let vp8 = b.pt(Codec::Vp8);
    assert!(got.iter().all(|r| r.pt == vp8));
    // Nothing of the audio track reaches B: it did not pull it.
    assert_eq!(b.received.len(), got.len());
    // Video leaves beside str0m too (the worker keeps it for NACKs, see
    // nack_rtx_recovers_loss_on_each_hop): all but the first and one in 1000.
    let egress = egress_rtp(&ts);
    assert!(egress >= 50, "video egress path used: {egress} packets");

    // PLI from the subscriber reaches the publisher (after the pacing interval).
    std::thread::sleep(Duration::from_millis(600));
    let before = a.peer.keyframe_requests.len();
    b.request_keyframe(mids[0]);
    assert!(
        pump(&mut [&mut a.peer, &mut b], Duration::from_secs(3), |p| {
            p[0].keyframe_requests.len() > before
        }),
        "subscriber PLI reaches the publisher"
    );
}

#[test]
fn push_pull_forwards_on_one_worker() {
    push_pull_forwards(1);
}

#[test]
fn push_pull_forwards_across_workers() {
    // Two sessions land on different workers (placement balances by session count).
    push_pull_forwards(2);
}

/// `n` sessions pulling the publisher's first track, all connected (with the publisher).
fn audio_subscribers(
    api: &Api,
    a: &mut Publisher,
    n: usize,
) -> Vec<(ClientPeer, str0m::media::Mid)> {
    let mut subs: Vec<(ClientPeer, str0m::media::Mid)> = (0..n)
        .map(|_| {
            let s = api.new_session();
            let mut p = ClientPeer::new();
            let mids = pull(api, &s, &mut p, &[(&a.session, &a.names[0])]);
            (p, mids[0])
        })
        .collect();
    let mut all: Vec<&mut ClientPeer> = subs.iter_mut().map(|(p, _)| p).collect();
    all.push(&mut a.peer);
    assert!(pump(&mut all, Duration::from_secs(5), |p| p
        .iter()
        .all(|c| c.connected)));
    subs
}

fn audio_fans_out(workers: usize, n: usize) {
    let ts = TestServer::start(workers);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio], "mic");
    let mut subs = audio_subscribers(api, &mut a, n);
    let pt = a.peer.pt(Codec::Opus);
    let mut others: Vec<&mut ClientPeer> = subs.iter_mut().map(|(p, _)| p).collect();
    let sent = stream(&mut a.peer, &mut others, a.mids[0], pt, 10, 40);
    for (p, mid) in &subs {
        let got = p.received_on(*mid);
        assert!(
            got.len() >= 35,
            "each subscriber hears the publisher ({})",
            got.len()
        );
        assert!(got.iter().all(|r| sent.contains(&r.payload.to_vec())));
        // In order and continuously numbered across both ways out (str0m's and ours).
        assert_continuous(&got, 3000);
    }
    // Audio has no NACK: after each subscriber's first packet (through str0m, as one in
    // every 200 is), the rest were sealed and sent beside str0m, and decrypted fine above.
    let egress = egress_rtp(&ts);
    assert!(
        egress >= n as u64 * 30,
        "audio egress path used: {egress} packets"
    );
    // Every packet forwarded went out in answer to the read that brought it, so each is
    // in the send-delay histogram operators see; the rest of what was sent may not be.
    let delayed = send_delay_count(&ts);
    let sent = worker_sum(&ts, |s| &s.tx_datagrams);
    assert!(
        delayed >= egress && delayed <= sent,
        "send delay counted {delayed} datagrams: {egress} forwarded beside str0m, {sent} sent"
    );
}

/// `opencalls_send_delay_seconds` over all workers as `/metrics` shows it, after checking
/// that each worker's buckets are cumulative and end at its `_count`.
fn send_delay_count(ts: &TestServer) -> u64 {
    let m = opencalls_testkit::api::raw_request(ts.api.addr, "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    let value = |l: &str| -> u64 { l.rsplit(' ').next().unwrap().parse().unwrap() };
    let mut total = 0;
    for w in 0..ts.server().control().workers().len() {
        let worker = format!("{{worker=\"{w}\"");
        let buckets: Vec<u64> = m
            .body
            .lines()
            .filter(|l| l.starts_with("opencalls_send_delay_seconds_bucket") && l.contains(&worker))
            .map(value)
            .collect();
        assert_eq!(buckets.len(), opencalls_sfu::delay::BOUNDS_US.len() + 1);
        assert!(
            buckets.windows(2).all(|b| b[0] <= b[1]),
            "cumulative: {buckets:?}"
        );
        let count = m
            .body
            .lines()
            .find(|l| l.starts_with("opencalls_send_delay_seconds_count") && l.contains(&worker))
            .map(value)
            .expect("a count per worker");
        assert_eq!(buckets.last(), Some(&count), "+Inf bucket is the count");
        total += count;
    }
    total
}

#[test]
fn audio_fans_out_to_many_subscribers() {
    audio_fans_out(2, 3);
}

#[test]
fn audio_fans_out_past_one_read_ahead_chunk() {
    // One worker fans each packet out 16 subscribers at a time (READ_AHEAD): 20 take two.
    audio_fans_out(1, 20);
}

#[test]
fn a_burst_keeps_its_order_across_both_ways_out() {
    // Packets sent back to back reach the worker in one read batch, which it fans out per
    // subscriber; every 200th packet goes through str0m (here the 200th, in the middle of a
    // burst) and must leave between its sealed neighbours.
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio], "mic");
    let mut subs = audio_subscribers(api, &mut a, 2);
    let pt = a.peer.pt(Codec::Opus);
    let before = egress_rtp(&ts);
    // Groups of 10 (the test clients read one datagram per step), then a burst of 40 around
    // the 200th packet.
    let mut seq = 10u64;
    for group in [10; 18].into_iter().chain([40]) {
        for _ in 0..group {
            assert!(a
                .peer
                .send_rtp(a.mids[0], pt, seq, (seq * 960) as u32, b"opus"));
            seq += 1;
        }
        let mut all: Vec<&mut ClientPeer> = subs.iter_mut().map(|(p, _)| p).collect();
        all.push(&mut a.peer);
        pump(&mut all, Duration::from_millis(100), |_| false);
    }
    let mut all: Vec<&mut ClientPeer> = subs.iter_mut().map(|(p, _)| p).collect();
    pump(&mut all, Duration::from_millis(300), |_| false);
    for (p, mid) in &subs {
        let got = p.received_on(*mid);
        assert!(got.len() >= 215, "received {}", got.len());
        assert_continuous(&got, 960);
    }
    assert!(
        egress_rtp(&ts) - before >= 2 * 210,
        "most left beside str0m"
    );
}

#[test]
fn audio_beside_str0m_keeps_sender_reports_in_step_with_the_packets() {
    // Real-time audio (20 ms, 960 ticks at 48 kHz) for longer than str0m's 5 s audio report
    // interval: every packet but the first leaves beside str0m (one in 1000 goes through
    // it, see `EGRESS_STR0M_EVERY`), and the sender reports (which receivers use for A/V
    // sync) must still map the RTP time of the packets the subscriber is getting.
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio], "mic");
    let (_, mut b, mids) = subscribe_connected(api, &mut a, &[0]);
    let mid = mids[0];
    let pt = a.peer.pt(Codec::Opus);
    let start = std::time::Instant::now();
    for i in 0..400u64 {
        assert!(a
            .peer
            .send_rtp(a.mids[0], pt, 100 + i, (i * 960) as u32, b"opus"));
        let due = start + Duration::from_millis(20 * (i + 1));
        pump(
            &mut [&mut a.peer, &mut b],
            due.saturating_duration_since(std::time::Instant::now()),
            |_| false,
        );
        if b.sender_reports
            .iter()
            .any(|r| r.mid == mid && r.received_before > 0)
            && i > 300
        {
            break;
        }
    }
    let got = b.received_on(mid);
    assert!(got.len() >= 250, "received {}", got.len());
    let sr = b
        .sender_reports
        .iter()
        .rev()
        .find(|r| r.mid == mid && r.received_before > 0)
        .expect("a sender report for the audio m-line arrived while media flowed");
    // The packet that arrived just before the report: its RTP time and the report's agree
    // to within a few packets (the report extrapolates from str0m's last write, here the
    // first packet, by the wall clock).
    let last = b.received[sr.received_before - 1].rtp_time;
    let gap = sr.rtp_time.wrapping_sub(last) as i32;
    assert!(
        gap.abs() < 960 * 5,
        "report RTP time {} vs last packet {last}: {gap} ticks apart",
        sr.rtp_time
    );
    assert!(sr.packet_count > 0, "str0m counted its own writes");
    assert!(egress_rtp(&ts) > 200, "most packets left beside str0m");
}

/// Packets the media workers sent without str0m.
fn egress_rtp(ts: &TestServer) -> u64 {
    worker_sum(ts, |s| &s.egress_rtp)
}

/// Retransmissions the media workers sent without str0m.
fn egress_rtx(ts: &TestServer) -> u64 {
    worker_sum(ts, |s| &s.egress_rtx)
}

fn worker_sum(
    ts: &TestServer,
    counter: impl Fn(&opencalls_sfu::WorkerStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    ts.server()
        .control()
        .workers()
        .iter()
        .map(|w| counter(w.stats()).load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

#[test]
fn nack_rtx_recovers_loss_on_each_hop() {
    nack_rtx_recovers_loss_on_each_hop_with(IngressArg::Beside);
}

/// The same with str0m receiving the publisher's RTP (`--ingress str0m`): its NACKs and RTX
/// on the first hop.
#[test]
fn nack_rtx_recovers_loss_on_each_hop_with_str0m_receiving() {
    nack_rtx_recovers_loss_on_each_hop_with(IngressArg::Str0m);
}

fn nack_rtx_recovers_loss_on_each_hop_with(ingress: IngressArg) {
    let mut config = ServeConfig::for_tests(APP, SECRET, 2);
    config.ingress = ingress;
    let ts = TestServer::start_with(config);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Video], "lossy");
    let (_, mut b, mids) = subscribe_connected(api, &mut a, &[0]);
    let mid = mids[0];
    // Lose packets publisher → SFU, and (other ones) SFU → subscriber: sealed beside
    // str0m (10, 28, 29) and, among 1000..=1005, the 1000th packet, written through str0m (the
    // first and one in 1000 are, see `EGRESS_STR0M_EVERY`; the three retransmissions before
    // it make it the 1003rd datagram): the worker answers NACKs for both kinds.
    a.peer.drop_outgoing_rtp = vec![20, 35];
    b.drop_incoming_rtp = vec![10, 28, 29, 1000, 1001, 1002, 1003, 1004, 1005];
    let pt = a.peer.pt(Codec::Vp8);
    let sent = stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 500, 1030);
    pump(&mut [&mut a.peer, &mut b], Duration::from_secs(2), |p| {
        p[1].received_on(mid).len() >= 1030
    });
    let (egress, rtx) = (egress_rtp(&ts), egress_rtx(&ts));
    let nacked = worker_sum(&ts, |s| &s.egress_nacked);
    assert!(egress >= 50, "video left beside str0m: {egress} packets");
    assert!(rtx >= 9, "retransmissions answered beside str0m: {rtx}");
    assert!(
        nacked >= rtx,
        "{nacked} sequence numbers NACKed, {rtx} answered"
    );
    let got: Vec<Vec<u8>> = b
        .received_on(mid)
        .iter()
        .map(|r| r.payload.to_vec())
        .collect();
    let missing: Vec<usize> = (0..sent.len())
        .filter(|i| !got.contains(&sent[*i]))
        .collect();
    assert!(missing.is_empty(), "lost for good: packets {missing:?}");
    // The repaired packets kept their place in the subscriber's numbering, and their RTP
    // time: the publisher's (3000 ticks a packet) moved by the subscriber's one offset.
    let received = b.received_on(mid);
    let first = &received[0];
    for r in &received {
        let ticks = (r.seq.wrapping_sub(first.seq) as u32).wrapping_mul(3000);
        assert_eq!(
            r.rtp_time.wrapping_sub(first.rtp_time),
            ticks,
            "RTP time of seq {}",
            r.seq
        );
    }
    let mut seqs: Vec<u64> = received.iter().map(|r| r.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 1030);
    assert_eq!(seqs[1029] - seqs[0], 1029);
    // On the first hop: the receive path beside str0m NACKed and unwrapped (its counts
    // reach the worker's stats at housekeeping), or, with str0m receiving, nothing did.
    let counts = |ts: &TestServer| {
        [
            worker_sum(ts, |s| &s.ingress_nacked),
            worker_sum(ts, |s| &s.ingress_rtx),
            worker_sum(ts, |s| &s.ingress_feedback),
        ]
    };
    pump(&mut [&mut a.peer, &mut b], Duration::from_secs(2), |_| {
        counts(&ts)[1] >= 2
    });
    let [nacked, unwrapped, feedback] = counts(&ts);
    if ingress == IngressArg::Beside {
        assert!(
            nacked >= 2,
            "{nacked} sequence numbers NACKed to the publisher"
        );
        assert!(unwrapped >= 2, "{unwrapped} retransmissions unwrapped");
        assert!(feedback > 0, "no transport-cc feedback sent");
    } else {
        assert_eq!([nacked, unwrapped, feedback], [0, 0, 0]);
    }
}

#[test]
fn pulling_the_same_track_twice_gives_two_working_m_lines() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Video], "twice");
    let sb = api.new_session();
    let mut b = ClientPeer::new();
    let first = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    let second = pull(api, &sb, &mut b, &[(&a.session, &a.names[0])])[0];
    assert_ne!(first, second);
    assert!(pump(
        &mut [&mut a.peer, &mut b],
        Duration::from_secs(5),
        |p| p[1].connected
    ));
    let pt = a.peer.pt(Codec::Vp8);
    stream(&mut a.peer, &mut [&mut b], a.mids[0], pt, 1, 20);
    pump(&mut [&mut a.peer, &mut b], Duration::from_secs(1), |p| {
        p[1].received_on(first).len() >= 20 && p[1].received_on(second).len() >= 20
    });
    let (n1, n2) = (b.received_on(first).len(), b.received_on(second).len());
    assert!(
        n1 >= 15 && n2 >= 15,
        "first {n1}, second {n2}, total {}",
        b.received.len()
    );
    // And in one request: two m-lines whose msids differ.
    let sc = api.new_session();
    let item =
        serde_json::json!({"location": "remote", "sessionId": a.session, "trackName": a.names[0]});
    let r = api.send(
        "POST",
        &format!("sessions/{sc}/tracks/new"),
        Some(&serde_json::json!({ "tracks": [item.clone(), item] })),
    );
    let sdp = r.json()["sessionDescription"]["sdp"]
        .as_str()
        .unwrap()
        .to_string();
    let msids: Vec<&str> = sdp.lines().filter(|l| l.starts_with("a=msid:")).collect();
    assert_eq!(msids.len(), 2);
    assert_ne!(msids[0], msids[1], "duplicate a=msid lines: {msids:?}");
}

#[test]
fn every_codec_is_forwarded_as_is() {
    let ts = TestServer::start(1);
    let api = &ts.api;
    let mut a = publish(api, &[MediaKind::Audio, MediaKind::Video], "codecs");
    let (_, mut b, mids) = subscribe_connected(api, &mut a, &[0, 1]);
    let plan = [
        (0, Codec::Opus),
        (0, Codec::PCMU),
        (0, Codec::PCMA),
        (1, Codec::Vp8),
        (1, Codec::Vp9),
        (1, Codec::H264),
        (1, Codec::Av1),
    ];
    let mut seq = [1u64, 1u64];
    for (track, codec) in plan {
        let before = b.received_on(mids[track]).len();
        let pt = a.peer.pt(codec);
        stream(
            &mut a.peer,
            &mut [&mut b],
            a.mids[track],
            pt,
            seq[track],
            10,
        );
        seq[track] += 10;
        pump(
            &mut [&mut a.peer, &mut b],
            Duration::from_millis(500),
            |p| p[1].received_on(mids[track]).len() >= before + 10,
        );
        let got = b.received_on(mids[track]);
        let new = &got[before..];
        assert!(new.len() >= 8, "{codec:?}: {} packets", new.len());
        let want = b.pt(codec);
        assert!(
            new.iter().all(|r| r.pt == want),
            "{codec:?} arrives as {codec:?} (pt {want}), got {:?}",
            new.iter().map(|r| r.pt).collect::<Vec<_>>()
        );
    }
}
