//! Smoke test of the Janus side of the benchmark: starts Janus (VideoRoom over HTTP) inside a
//! network namespace of its own, publishes (audio + video m-lines, VP8 packets on the video
//! one) from one str0m client, subscribes a second one and checks the RTP payloads arrive
//! there unchanged.
//!
//! `cargo run --release -p opencalls-bench --example janus_smoke [-- --loopback] [--port N] [--cpu C]`
//! (root needed: it re-runs itself under `unshare --net`; Janus from setup-janus.sh).
//! Default: clients bind 10.213.0.1 (the namespace's veth address, like Janus).
//! `--loopback`: clients are `opencalls_testkit::ClientPeer` (bound to 127.0.0.1) instead;
//! this is EXPECTED TO FAIL (Janus/libnice never completes ICE with a loopback peer
//! candidate), kept to show why clients must bind the namespace address.

#[allow(dead_code)]
#[path = "../src/janus.rs"]
mod janus;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use opencalls_testkit::ClientPeer;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, Extension, ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use janus::{JanusClient, JanusServer, NETNS_IP};

/// What the smoke test needs from a client.
trait Peer {
    /// An offer with a send-only audio and a send-only video m-line; returns the video mid.
    fn offer_av(&mut self) -> (String, Mid);
    fn accept_answer(&mut self, sdp: &str);
    fn accept_offer(&mut self, sdp: &str) -> String;
    fn vp8(&self) -> u8;
    fn send(&mut self, mid: Mid, pt: u8, seq: u64, ts: u32, payload: &[u8]) -> bool;
    fn step(&mut self);
    fn connected(&self) -> bool;
    fn payloads(&self) -> Vec<Vec<u8>>;
    /// (RTP sequence number, whether abs-capture-time was present) of each packet received.
    fn headers(&self) -> Vec<(u64, Option<bool>)>;
}

impl Peer for ClientPeer {
    fn offer_av(&mut self) -> (String, Mid) {
        let (sdp, mids) = self.offer_send(&[MediaKind::Audio, MediaKind::Video]);
        (sdp, mids[1])
    }
    fn accept_answer(&mut self, sdp: &str) {
        ClientPeer::accept_answer(self, sdp)
    }
    fn accept_offer(&mut self, sdp: &str) -> String {
        ClientPeer::accept_offer(self, sdp)
    }
    fn vp8(&self) -> u8 {
        self.pt(Codec::Vp8)
    }
    fn send(&mut self, mid: Mid, pt: u8, seq: u64, ts: u32, payload: &[u8]) -> bool {
        self.send_rtp(mid, pt, seq, ts, payload)
    }
    fn step(&mut self) {
        ClientPeer::step(self)
    }
    fn connected(&self) -> bool {
        self.connected
    }
    fn payloads(&self) -> Vec<Vec<u8>> {
        self.received.iter().map(|r| r.payload.to_vec()).collect()
    }
    fn headers(&self) -> Vec<(u64, Option<bool>)> {
        self.received.iter().map(|r| (r.seq, None)).collect()
    }
}

/// A minimal str0m client (RTP mode, full ICE) bound to any local address.
struct MiniPeer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    payloads: Vec<Vec<u8>>,
    headers: Vec<(u64, Option<bool>)>,
    buf: Vec<u8>,
}

impl MiniPeer {
    fn bind(ip: IpAddr) -> Result<MiniPeer> {
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .set_stats_interval(None)
            .set_extension(7, Extension::AbsoluteCaptureTime)
            .build(Instant::now());
        let socket = UdpSocket::bind((ip, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(1)))?;
        let local = socket.local_addr()?;
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(MiniPeer {
            rtc,
            socket,
            local,
            pending: None,
            connected: false,
            payloads: Vec::new(),
            headers: Vec::new(),
            buf: vec![0; 2048],
        })
    }

    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(_)) | Err(_) => return,
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(Event::RtpPacket(p))) => {
                    let abs = p.header.ext_vals.abs_capture_time.is_some();
                    self.headers.push((*p.seq_no, Some(abs)));
                    self.payloads.push(p.payload.to_vec());
                }
                Ok(Output::Event(_)) => {}
            }
        }
    }
}

impl Peer for MiniPeer {
    fn offer_av(&mut self) -> (String, Mid) {
        let mut api = self.rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().expect("an offer");
        self.pending = Some(pending);
        (offer.to_sdp_string(), mid)
    }
    fn accept_answer(&mut self, sdp: &str) {
        let answer = SdpAnswer::from_sdp_string(sdp).expect("answer parses");
        let pending = self.pending.take().expect("pending offer");
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("answer accepted");
    }
    fn accept_offer(&mut self, sdp: &str) -> String {
        let offer = SdpOffer::from_sdp_string(sdp).expect("offer parses");
        self.rtc
            .sdp_api()
            .accept_offer(offer)
            .expect("offer accepted")
            .to_sdp_string()
    }
    fn vp8(&self) -> u8 {
        *self
            .rtc
            .codec_config()
            .find(|p| p.spec().codec == Codec::Vp8)
            .expect("vp8")
            .pt()
    }
    fn send(&mut self, mid: Mid, pt: u8, seq: u64, ts: u32, payload: &[u8]) -> bool {
        let now = Instant::now();
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(pt.into(), seq.into(), ts, now, payload.to_vec())
                .marker(true)
                .nackable(true)
                .ext_vals(ExtensionValues {
                    abs_capture_time: Some(AbsCaptureTime {
                        capture_time: SystemTime::now(),
                        clock_offset: None,
                    }),
                    ..Default::default()
                }),
        );
        self.drain();
        true
    }
    fn step(&mut self) {
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, source)) => {
                if let Ok(contents) = self.buf[..n].try_into() {
                    let _ = self.rtc.handle_input(Input::Receive(
                        Instant::now(),
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: self.local,
                            contents,
                        },
                    ));
                }
            }
            Err(_) => {
                let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
        self.drain();
    }
    fn connected(&self) -> bool {
        self.connected
    }
    fn payloads(&self) -> Vec<Vec<u8>> {
        self.payloads.clone()
    }
    fn headers(&self) -> Vec<(u64, Option<bool>)> {
        self.headers.clone()
    }
}

fn sdp_lines<'a>(sdp: &'a str, prefixes: &[&str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = sdp
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect();
    v.dedup();
    v
}

/// A VP8 "keyframe" payload: descriptor (S=1, PID 0), frame tag (P=0), start code, 320x240,
/// then a filler that numbers the packet.
fn vp8_payload(n: u32) -> Vec<u8> {
    let mut p = vec![
        0x10, 0x50, 0x01, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00,
    ];
    p.extend_from_slice(&n.to_be_bytes());
    p.resize(400, 0xab);
    p
}

fn run(
    publisher: &mut dyn Peer,
    subscriber: &mut dyn Peer,
    port: u16,
    cpu: Option<usize>,
) -> Result<()> {
    let t0 = Instant::now();
    let server = JanusServer::start(port, IpAddr::V4(NETNS_IP), cpu)?;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap_or_default();
    let cpus = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list"))
        .unwrap_or("?")
        .to_string();
    println!(
        "janus pid {} up on 127.0.0.1:{port} after {:?} ({cpus})",
        server.pid(),
        t0.elapsed()
    );
    let result = session(publisher, subscriber, port);
    if result.is_err() {
        eprintln!("--- janus log tail ---\n{}", server.log_tail(60));
    }
    server.stop();
    result
}

fn session(publisher: &mut dyn Peer, subscriber: &mut dyn Peer, port: u16) -> Result<()> {
    let client = JanusClient::connect(port)?;
    let room = client.create_room(4)?;
    println!("session {} room {room}", client.session_id());

    let (offer, mid) = publisher.offer_av();
    let (answer, feed) = client.publish(room, "pub", &offer)?;
    println!(
        "published feed {feed}; offer {:?}; answer {:?}",
        sdp_lines(&offer, &["a=setup", "a=candidate"]),
        sdp_lines(
            &answer,
            &[
                "a=setup",
                "a=ice-lite",
                "a=candidate",
                "a=rtpmap",
                "a=extmap"
            ]
        )
    );
    publisher.accept_answer(&answer);

    let pt = publisher.vp8();
    let mut seq = 0u64;
    let mut last_send = Instant::now() - Duration::from_secs(1);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    // Pumps both peers; the publisher sends ~50 packets/s once connected.
    let mut pump = |publisher: &mut dyn Peer,
                    subscriber: &mut dyn Peer,
                    limit: Duration,
                    done: &dyn Fn(&dyn Peer, &dyn Peer) -> bool|
     -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            publisher.step();
            subscriber.step();
            if publisher.connected() && last_send.elapsed() >= Duration::from_millis(20) {
                last_send = Instant::now();
                if seq % 10 == 5 {
                    seq += 1; // a deliberate gap: does Janus keep it?
                }
                let payload = vp8_payload(seq as u32);
                if publisher.send(mid, pt, seq, (seq as u32) * 3000, &payload) {
                    sent.push(payload);
                    seq += 1;
                }
            }
            if done(&*publisher, &*subscriber) {
                return true;
            }
        }
        false
    };

    let t = Instant::now();
    if !pump(publisher, subscriber, Duration::from_secs(10), &|p, _| {
        p.connected()
    }) {
        bail!("publisher: ICE/DTLS with janus did not come up in 10 s");
    }
    println!("publisher connected (ICE+DTLS) in {:?}", t.elapsed());

    let (handle, offer) = client.subscribe(room, feed)?;
    println!(
        "subscriber handle {handle}; janus offer {:?}",
        sdp_lines(
            &offer,
            &[
                "m=",
                "a=setup",
                "a=ice-lite",
                "a=candidate",
                "a=rtpmap",
                "a=mid"
            ]
        )
    );
    let answer = subscriber.accept_offer(&offer);
    println!(
        "subscriber answer {:?}",
        sdp_lines(&answer, &["a=setup", "a=candidate", "a=rtpmap"])
    );
    client.start_subscriber(handle, &answer)?;

    let t = Instant::now();
    if !pump(publisher, subscriber, Duration::from_secs(10), &|_, s| {
        s.connected()
    }) {
        bail!("subscriber: ICE/DTLS with janus did not come up in 10 s");
    }
    println!("subscriber connected (ICE+DTLS) in {:?}", t.elapsed());
    let t = Instant::now();
    let ok = pump(publisher, subscriber, Duration::from_secs(10), &|_, s| {
        s.payloads().len() >= 100
    });
    let got = subscriber.payloads();
    println!(
        "subscriber got {} RTP packets in {:?} (publisher sent {} in total)",
        got.len(),
        t.elapsed(),
        sent.len()
    );
    if !ok {
        bail!("subscriber received only {} RTP packets", got.len());
    }
    let unknown = got.iter().filter(|p| !sent.contains(p)).count();
    if unknown > 0 {
        bail!("{unknown} received payloads differ from every sent one");
    }
    // Diagnostics for the benchmark: does Janus keep sequence gaps and abs-capture-time?
    let headers = subscriber.headers();
    let offsets: Vec<i64> = headers
        .iter()
        .zip(&got)
        .map(|((seq, _), p)| *seq as i64 - u32::from_be_bytes([p[11], p[12], p[13], p[14]]) as i64)
        .collect();
    let gaps_kept = offsets.windows(2).all(|w| w[0] == w[1]);
    let abs = headers.iter().filter(|(_, a)| *a == Some(true)).count();
    let abs_known = headers.iter().filter(|(_, a)| a.is_some()).count();
    println!(
        "sequence gaps preserved by janus: {gaps_kept} (rx seq - tx seq: {:?}..{:?}); \
         abs-capture-time present on {abs}/{abs_known} received packets",
        offsets.first(),
        offsets.last()
    );
    println!(
        "all received payloads match sent ones; events: {:?}",
        client
            .take_unsolicited()
            .iter()
            .map(|e| e["janus"].as_str().unwrap_or("?").to_string())
            .collect::<Vec<_>>()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let loopback = args.iter().any(|a| a == "--loopback");
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .map(|p| p.parse::<u16>())
        .transpose()
        .context("--port")?
        .unwrap_or(18088);
    let cpu = args
        .iter()
        .position(|a| a == "--cpu")
        .and_then(|i| args.get(i + 1))
        .map(|c| c.parse::<usize>())
        .transpose()
        .context("--cpu")?;
    janus::reexec_in_netns(NETNS_IP, Duration::from_secs(120))?;
    let r = if loopback {
        println!("clients: opencalls_testkit::ClientPeer on 127.0.0.1");
        run(&mut ClientPeer::new(), &mut ClientPeer::new(), port, cpu)
    } else {
        println!("clients: MiniPeer on {NETNS_IP}");
        run(
            &mut MiniPeer::bind(IpAddr::V4(NETNS_IP))?,
            &mut MiniPeer::bind(IpAddr::V4(NETNS_IP))?,
            port,
            cpu,
        )
    };
    match &r {
        Ok(()) => println!("JANUS SMOKE OK"),
        Err(e) => println!("JANUS SMOKE FAILED: {e:#}"),
    }
    r
}
