//! Scenarios, topologies and one measured step per target.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use opencalls_testkit::Api;
use serde_json::{json, Value};
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid};

use crate::peer::BenchPeer;
use crate::rtp::{percentile, Meter};
use crate::storm::{Joining, Storm};
use crate::sys;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    AudioRoom,
    Webinar,
    Meeting,
    JoinStorm,
    Api,
}

/// What a step varies.
#[derive(Debug, Clone)]
pub struct Step {
    /// Listeners, subscribers, participants, or request rounds.
    pub n: usize,
}

impl Step {
    pub fn describe(&self) -> String {
        format!("n={}", self.n)
    }
}

impl Scenario {
    pub fn parse(s: &str) -> anyhow::Result<Scenario> {
        Ok(match s {
            "audio-room" => Scenario::AudioRoom,
            "webinar" => Scenario::Webinar,
            "meeting" => Scenario::Meeting,
            "join-storm" => Scenario::JoinStorm,
            "api" => Scenario::Api,
            _ => anyhow::bail!("unknown scenario {s:?}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::AudioRoom => "audio-room",
            Scenario::Webinar => "webinar",
            Scenario::Meeting => "meeting",
            Scenario::JoinStorm => "join-storm",
            Scenario::Api => "api",
        }
    }

    pub fn steps(self, quick: bool) -> Vec<Step> {
        let ns: &[usize] = match (self, quick) {
            (Scenario::AudioRoom, true) => &[5, 20],
            (Scenario::AudioRoom, false) => &[10, 25, 50, 100, 200, 300, 400, 600, 800],
            (Scenario::Webinar, true) => &[10, 40],
            (Scenario::Webinar, false) => {
                &[25, 50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500]
            }
            (Scenario::Meeting, true) => &[3, 5],
            (Scenario::Meeting, false) => {
                &[4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56]
            }
            // Joins per second.
            (Scenario::JoinStorm, true) => &[20],
            (Scenario::JoinStorm, false) => &[10, 25, 50, 100, 200],
            (Scenario::Api, true) => &[50],
            (Scenario::Api, false) => &[500, 1000, 2000],
        };
        ns.iter().map(|n| Step { n: *n }).collect()
    }

    /// Publishers (their track kinds) and subscribers (the (publisher, track) pairs each pulls).
    fn topology(self, n: usize, quick: bool, sending: Sending) -> Topology {
        let av = vec![MediaKind::Audio, MediaKind::Video];
        let (publishers, subscribers) = match self {
            // The background a storm runs over: a webinar whose joiners pull the same tracks.
            Scenario::JoinStorm => {
                let n = if quick { 10 } else { STORM_BACKGROUND };
                return Scenario::Webinar.topology(n, quick, sending);
            }
            Scenario::Webinar => (vec![av], (0..n).map(|_| vec![(0, 0), (0, 1)]).collect()),
            Scenario::AudioRoom => (
                (0..10).map(|_| vec![MediaKind::Audio]).collect(),
                (0..n).map(|_| (0..10).map(|p| (p, 0)).collect()).collect(),
            ),
            Scenario::Meeting => (
                (0..n).map(|_| av.clone()).collect(),
                (0..n)
                    .map(|me| {
                        (0..n)
                            .filter(|p| *p != me)
                            .flat_map(|p| [(p, 0), (p, 1)])
                            .collect()
                    })
                    .collect(),
            ),
            Scenario::Api => (Vec::new(), Vec::new()),
        };
        Topology {
            publishers,
            subscribers,
            sending,
        }
    }
}

/// How a publisher puts a video frame's packets on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sending {
    /// Through a leaky-bucket pacer at 2.5x the stream's bitrate, as libwebrtc's paced sender
    /// does: a delta frame's 6 packets leave over ~13 ms, a keyframe's 25 over ~56 ms.
    #[default]
    Paced,
    /// A frame's packets back to back: every keyframe reaches the server as one burst (the
    /// worst case; what the benchmark did before 2026-11-29's second session).
    Burst,
}

impl Sending {
    pub fn name(self) -> &'static str {
        match self {
            Sending::Paced => "paced",
            Sending::Burst => "burst",
        }
    }
}

/// Background webinar subscribers under a full join-storm.
const STORM_BACKGROUND: usize = 20;

#[derive(Debug)]
struct Topology {
    publishers: Vec<Vec<MediaKind>>,
    subscribers: Vec<Vec<(usize, usize)>>,
    sending: Sending,
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Opencalls,
    Raw,
    Janus,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Opencalls => "opencalls",
            Target::Raw => "raw",
            Target::Janus => "janus",
        }
    }
}

/// What one step measured.
#[derive(Debug, Clone, Default)]
pub struct StepResult {
    pub out_pps: f64,
    pub server_busy_cores: f64,
    /// Of the server's core, the share the hypervisor ran something else (not in
    /// `server_busy_cores`).
    pub server_steal: f64,
    pub generator_busy: f64,
    pub loss: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// p50/p99 to the kernel's queueing on the subscriber's socket (`--socket-times`, rx.rs).
    pub socket_ms: Option<(f64, f64)>,
    /// opencalls: p50/p99 of its own `opencalls_send_delay_seconds` over the window (from
    /// its read of a datagram to the end of the send carrying what it forwarded).
    pub server_ms: Option<(f64, f64)>,
    pub rss_mb: f64,
    pub sessions: usize,
    pub subscribed_tracks: usize,
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    pub ops_per_sec: Option<f64>,
    /// join-storm: joins asked for during the window, and those that got no media.
    pub joins: Option<usize>,
    pub join_failures: usize,
    /// api: sessions/new + tracks/new (push) rounds per second, and the server's busy cores
    /// meanwhile.
    pub push: Option<(f64, f64)>,
    /// Keyframes publishers made because one was asked for, per second of the window.
    pub forced_keyframes_per_sec: Option<f64>,
    /// opencalls, at the end of the window: its busiest worker's load as `/metrics` shows it.
    pub worker_load: Option<f64>,
    /// opencalls, after the window: whether one more `sessions/new` was admitted (false:
    /// 503, no worker with room).
    pub admits_sessions: Option<bool>,
}

impl StepResult {
    pub fn out_pps_per_core(&self) -> f64 {
        if self.server_busy_cores > 0.0 {
            self.out_pps / self.server_busy_cores
        } else {
            0.0
        }
    }

    pub fn valid(&self) -> bool {
        self.generator_busy < 0.95
    }

    pub fn to_json(
        &self,
        s: Scenario,
        i: usize,
        t: Target,
        step: &Step,
        ratio: Option<f64>,
    ) -> Value {
        let us_per_pkt = (self.out_pps > 0.0).then(|| self.server_busy_cores * 1e6 / self.out_pps);
        json!({
            "scenario": s.name(), "step": i, "target": t.name(), "n": step.n,
            "out_pps": round(self.out_pps), "server_busy_cores": round3(self.server_busy_cores),
            "server_steal_cores": round3(self.server_steal),
            "out_pps_per_core": round(self.out_pps_per_core()), "ratio_to_raw": ratio.map(round3),
            "cpu_us_per_packet": us_per_pkt.map(round3),
            "loss": round6(self.loss), "p50_ms": self.p50_ms.map(round3), "p99_ms": self.p99_ms.map(round3),
            "p50_socket_ms": self.socket_ms.map(|r| round3(r.0)), "p99_socket_ms": self.socket_ms.map(|r| round3(r.1)),
            "p50_server_ms": self.server_ms.map(|r| round3(r.0)), "p99_server_ms": self.server_ms.map(|r| round3(r.1)),
            "rss_mb": round3(self.rss_mb), "valid": self.valid(), "generator_busy": round3(self.generator_busy),
            "sessions": self.sessions, "subscribed_tracks": self.subscribed_tracks,
            "join_p50_ms": self.join_p50_ms.map(round3), "join_p99_ms": self.join_p99_ms.map(round3),
            "sessions_per_sec": self.ops_per_sec.map(round),
            "sessions_per_sec_per_core": self.ops_per_sec.map(|o| round(if self.server_busy_cores > 0.0 { o / self.server_busy_cores } else { 0.0 })),
            "joins": self.joins, "join_failures": self.join_failures,
            "push_per_sec": self.push.map(|p| round(p.0)),
            "push_per_sec_per_core": self.push.map(|(r, b)| round(if b > 0.0 { r / b } else { 0.0 })),
            "forced_keyframes_per_sec": self.forced_keyframes_per_sec.map(round3),
            "worker_load": self.worker_load.map(round3),
            "admits_sessions": self.admits_sessions,
        })
    }
}

/// After a step's window, with its media still flowing: whether the server admits one more
/// session (201) or refuses it for want of room (503). Any other answer is an error of the
/// step.
fn admits_session(api: &Api) -> anyhow::Result<bool> {
    let auth = format!("Bearer {}", api.secret);
    let r = opencalls_testkit::api::try_request(
        api.addr,
        "POST",
        &format!("/v1/apps/{}/sessions/new", api.app),
        &[("Authorization", auth.as_str())],
        None,
        Duration::from_secs(5),
    )?;
    match r.status {
        201 => Ok(true),
        503 => Ok(false),
        s => anyhow::bail!("sessions/new after the window answered {s}: {}", r.body),
    }
}

/// An opencalls server's `/metrics` text; `None` if it did not answer.
fn metrics_text(addr: SocketAddr) -> Option<String> {
    let r = opencalls_testkit::api::try_request(
        addr,
        "GET",
        "/metrics",
        &[],
        None,
        Duration::from_secs(5),
    )
    .ok()?;
    Some(r.body)
}

/// The busiest worker's `opencalls_worker_load` in a `/metrics` text.
fn parse_worker_load(text: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with("opencalls_worker_load{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// opencalls' `opencalls_send_delay_seconds` in a `/metrics` text, summed over workers:
/// (upper bound in ms, cumulative count) per bucket, `+Inf` as infinity. `None` if it has
/// no such histogram.
fn parse_send_delay(text: &str) -> Option<Vec<(f64, u64)>> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("opencalls_send_delay_seconds_bucket{") else {
            continue;
        };
        let le = rest.split("le=\"").nth(1)?.split('"').next()?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse::<f64>().ok()? * 1000.0
        };
        let n: u64 = rest.rsplit(' ').next()?.parse().ok()?;
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += n,
            None => buckets.push((le, n)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!buckets.is_empty()).then_some(buckets)
}

/// p50 and p99 of what was counted between two readings, interpolated inside the bucket
/// (a quantile in the open-ended bucket reads as its lower bound).
fn send_delay_percentiles(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<(f64, f64)> {
    if before.len() != after.len() {
        return None;
    }
    let cum: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let total = cum.last()?.1;
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let want = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, c) in &cum {
            if c as f64 >= want {
                if bound.is_infinite() {
                    return lower.0;
                }
                let share = (want - lower.1 as f64) / (c - lower.1).max(1) as f64;
                return lower.0 + share * (bound - lower.0);
            }
            lower = (bound, c);
        }
        lower.0
    };
    Some((at(0.5), at(0.99)))
}

/// The step's added latency percentile: at the generator's read, or at the socket with
/// `--timer-reads` (reads then wait for the generator's tick).
fn latency(meter: &mut Meter, p: f64) -> Option<f64> {
    if crate::rx::timer_reads() {
        meter.socket_percentile(p)
    } else {
        meter.percentile(p)
    }
}

fn round(x: f64) -> f64 {
    x.round()
}
/// Milliseconds (and other figures) kept to three decimals in the JSON lines.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Joins Janus as a subscriber to `feed`. Janus lists a feed only once its side of the
/// publisher's PeerConnection is up ("webrtcup"), which can come a little after our
/// publisher saw DTLS connect: "No such feed" (428) is retried for up to 5 s while media
/// runs, anything else fails at once.
fn subscribe_when_live(
    client: &crate::janus::JanusClient,
    media: &mut Media,
    room: u64,
    feed: u64,
) -> anyhow::Result<(u64, String)> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match client.subscribe(room, feed) {
            Ok(r) => return Ok(r),
            Err(e) if e.to_string().contains("428") && Instant::now() < end => {
                media.run(Duration::from_millis(50), None);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs one step of a scenario against a target, from a fresh server.
pub fn run_step(
    target: Target,
    s: Scenario,
    step: &Step,
    quick: bool,
    sending: Sending,
) -> anyhow::Result<StepResult> {
    let (warm, window) = if quick {
        (Duration::from_millis(700), Duration::from_millis(1500))
    } else {
        (Duration::from_secs(2), Duration::from_secs(5))
    };
    let topology = s.topology(step.n, quick, sending);
    let rate = step.n as f64;
    match (target, s) {
        (Target::Janus, Scenario::JoinStorm) => {
            let mut w = JanusWorld::build(topology)?;
            let pid = w.server.pid();
            let joining = Joining::Janus {
                client: w.client.clone(),
                room: w.room,
                feed: w.feeds[0],
                ip: media_ip(),
            };
            w.media
                .measure_storm(Storm::start(joining, rate)?, warm, window, pid, None)
        }
        (Target::Opencalls, Scenario::JoinStorm) => {
            // Departed sessions are reaped 5 s after their client goes quiet, inside the run.
            let mut w = OpencallsWorld::build(topology, 5)?;
            let joining = Joining::Opencalls {
                api: w.api.clone(),
                session: w.names[0].0.clone(),
                tracks: w.names[0].1.clone(),
                ip: media_ip(),
            };
            let (pid, metrics) = (w.server.id(), Some(w.api.addr));
            w.media
                .measure_storm(Storm::start(joining, rate)?, warm, window, pid, metrics)
        }
        (Target::Raw, Scenario::JoinStorm) => {
            let mut w = RawWorld::build(topology)?;
            let joining = Joining::Raw {
                relay: w.relay_addr,
                groups: vec![0, 1],
            };
            let pid = w.relay.id();
            w.media
                .measure_storm(Storm::start(joining, rate)?, warm, window, pid, None)
        }
        (Target::Janus, Scenario::Api) => {
            anyhow::bail!("the api scenario measures the Calls API only")
        }
        (Target::Janus, _) => {
            let mut w = JanusWorld::build(topology)?;
            let pid = w.server.pid();
            w.media.measure(warm, window, pid, None)
        }
        (Target::Opencalls, Scenario::Api) => api_step(step, quick),
        (Target::Raw, Scenario::Api) => anyhow::bail!("a UDP relay has no API"),
        (Target::Opencalls, _) => {
            let mut w = OpencallsWorld::build(topology, 600)?;
            let mut r = w
                .media
                .measure(warm, window, w.server.id(), Some(w.api.addr))?;
            r.admits_sessions = Some(admits_session(&w.api)?);
            Ok(r)
        }
        (Target::Raw, _) => {
            let mut w = RawWorld::build(topology)?;
            w.media.measure(warm, window, w.relay.id(), None)
        }
    }
}

static MEDIA_IP: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();

/// Sets the one address every target's media uses for the run (servers bind it, clients
/// bind it): the namespace's veth address, or loopback for the `--loopback` cross-check.
/// The kernel's path depends on it: a datagram to a local address of a non-loopback
/// interface gets a freshly allocated route each send (the route is not cached for that
/// case), about 1.4 µs more per packet than to 127.0.0.1 on this machine. Every target of a
/// run therefore uses the same one.
pub fn set_media_ip(ip: std::net::IpAddr) {
    let _ = MEDIA_IP.set(ip);
}

/// Where media flows (see [`set_media_ip`]).
pub fn media_ip() -> std::net::IpAddr {
    *MEDIA_IP.get_or_init(|| crate::janus::NETNS_IP.into())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn opencalls_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("OPENCALLS_BIN") {
        return p.into();
    }
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("opencalls")
}

/// A process killed when dropped.
struct Proc(Child);
impl Proc {
    fn id(&self) -> u32 {
        self.0.id()
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_pinned(cpu: usize, program: &std::path::Path, args: &[String]) -> anyhow::Result<Proc> {
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

const APP: &str = "bench0000000000000000000000000000";
const SECRET: &str = "bench-secret";

/// Starts opencalls on the server core; `idle_secs` is its idle/disconnect timeout.
fn start_opencalls(idle_secs: u64) -> anyhow::Result<(Proc, Api)> {
    let port = free_port()?;
    let args: Vec<String> = [
        "serve",
        "--http",
        &format!("127.0.0.1:{port}"),
        "--udp",
        &format!("{}:0", media_ip()),
        "--app",
        &format!("{APP}:{SECRET}"),
        "--workers",
        "1",
        "--idle-timeout-secs",
        &idle_secs.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = spawn_pinned(1, &opencalls_binary(), &args)?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        anyhow::ensure!(
            Instant::now() < end,
            "opencalls did not start ({:?})",
            opencalls_binary()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = Api {
        addr,
        app: APP.into(),
        secret: SECRET.into(),
    };
    Ok((proc, api))
}

/// One publisher's sending state.
struct Source {
    kind: MediaKind,
    mid: Mid,
    pt: u8,
    seq: u64,
    /// When the next frame is captured.
    next: Instant,
    frame: u64,
    /// Raw relay only: the group id (publisher * 4 + track).
    group: u32,
    /// Frames captured and not yet fully sent: (RTP timestamp, packets left).
    queue: VecDeque<(u32, usize)>,
    /// The pacer: when the next queued packet may leave, and the gap between packets.
    paced_at: Instant,
    gap: Duration,
    /// A keyframe was asked for (PLI/FIR through an SFU, or a raw join), and when the last
    /// asked-for keyframe was made.
    key_wanted: bool,
    last_forced_key: Option<Instant>,
}

const VIDEO_PAYLOAD: usize = 1100;
const AUDIO_PAYLOAD: usize = 120;

/// Packets of a keyframe (periodic or asked for).
const KEYFRAME_PACKETS: usize = 25;
/// Frames between periodic keyframes (3 s at 30 fps).
const KEYFRAME_EVERY: u64 = 90;
/// Asked-for keyframes come at most this often (what opencalls' PLI pacing lets through).
const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(500);

/// libwebrtc paces at 2.5x the target bitrate: ~1.64 Mbit/s of 1,100-byte payloads (about
/// 1,150 bytes on the wire) is one packet per 2.25 ms.
const PACING_GAP: Duration = Duration::from_micros(2_250);

impl Source {
    fn new(kind: MediaKind, mid: Mid, pt: u8, group: u32, sending: Sending) -> Source {
        let now = Instant::now();
        let gap = match (kind, sending) {
            (MediaKind::Video, Sending::Paced) => PACING_GAP,
            _ => Duration::ZERO,
        };
        Source {
            kind,
            mid,
            pt,
            seq: 1,
            next: now,
            frame: 0,
            group,
            queue: VecDeque::new(),
            paced_at: now,
            gap,
            key_wanted: false,
            last_forced_key: None,
        }
    }

    /// Packets of the next frame: VP8-shaped video at 30 fps (keyframe of 25 packets every
    /// 3 s, else 6; ~1.6 Mbit/s) or Opus-shaped audio (one packet per 20 ms).
    fn frame_packets(&self) -> usize {
        match self.kind {
            MediaKind::Audio => 1,
            MediaKind::Video if self.frame.is_multiple_of(KEYFRAME_EVERY) => KEYFRAME_PACKETS,
            MediaKind::Video => 6,
        }
    }

    /// Captures the frames due by `now`: a keyframe when one was asked for (at most every
    /// [`KEYFRAME_REQUEST_GAP`]) or the periodic one is due. Returns how many keyframes were
    /// made because one was asked for.
    fn capture(&mut self, now: Instant) -> u64 {
        let mut forced_count = 0;
        while self.next <= now {
            if self.queue.is_empty() {
                self.paced_at = self.paced_at.max(self.next);
            }
            let forced = self.kind == MediaKind::Video
                && self.key_wanted
                && self
                    .last_forced_key
                    .is_none_or(|t| self.next >= t + KEYFRAME_REQUEST_GAP);
            let n = if forced {
                self.key_wanted = false;
                self.last_forced_key = Some(self.next);
                forced_count += 1;
                KEYFRAME_PACKETS
            } else {
                self.frame_packets()
            };
            self.queue.push_back((self.rtp_time(), n));
            self.frame += 1;
            self.next += self.interval();
        }
        forced_count
    }

    /// The next packet the pacer lets leave by `now`: (sequence number, RTP timestamp,
    /// marker: the frame's last packet).
    fn next_packet(&mut self, now: Instant) -> Option<(u64, u32, bool)> {
        if self.paced_at > now {
            return None;
        }
        let (ts, left) = self.queue.front_mut()?;
        *left -= 1;
        let (ts, last) = (*ts, *left == 0);
        if last {
            self.queue.pop_front();
        }
        let seq = self.seq;
        self.seq += 1;
        self.paced_at += self.gap;
        Some((seq, ts, last))
    }

    /// When this source next needs the loop: its next frame, or its next paced packet.
    fn wake(&self) -> Instant {
        if self.queue.is_empty() {
            self.next
        } else {
            self.next.min(self.paced_at)
        }
    }

    fn interval(&self) -> Duration {
        match self.kind {
            MediaKind::Audio => Duration::from_millis(20),
            MediaKind::Video => Duration::from_micros(33_333),
        }
    }

    fn rtp_time(&self) -> u32 {
        match self.kind {
            MediaKind::Audio => (self.frame * 960) as u32,
            MediaKind::Video => (self.frame * 3000) as u32,
        }
    }
}

/// Sockets, sources and receivers of one world, driven on the generator core.
struct Media {
    /// Peers (publishers first); `sources[i].0` indexes into it.
    peers: Vec<Driver>,
    sources: Vec<(usize, Source)>,
    poll: Poll,
    sessions: usize,
    subscribed_tracks: usize,
    video: Arc<[u8]>,
    audio: Arc<[u8]>,
    storm: Option<Storm>,
    /// Keyframes made because one was asked for.
    forced_keyframes: u64,
}

// Peers live in one Vec for their whole run; boxing would only add an indirection per packet.
#[allow(clippy::large_enum_variant)]
pub enum Driver {
    Str0m(BenchPeer),
    Raw(crate::raw_client::RawPeer),
    /// A joiner that left (its slot stays so tokens keep their meaning).
    Gone,
}

impl Driver {
    /// The peer's socket (none once it left).
    pub fn socket(&mut self) -> Option<&mut mio::net::UdpSocket> {
        match self {
            Driver::Str0m(p) => Some(&mut p.socket),
            Driver::Raw(p) => Some(&mut p.socket),
            Driver::Gone => None,
        }
    }

    /// When its first media packet arrived.
    pub fn first_rtp(&self) -> Option<Instant> {
        match self {
            Driver::Str0m(p) => p.first_rtp,
            Driver::Raw(p) => p.first_rtp,
            Driver::Gone => None,
        }
    }
}

impl Media {
    fn new(
        peers: Vec<Driver>,
        sources: Vec<(usize, Source)>,
        sessions: usize,
        subscribed: usize,
    ) -> anyhow::Result<Media> {
        let poll = Poll::new()?;
        let mut m = Media {
            peers,
            sources,
            poll,
            sessions,
            subscribed_tracks: subscribed,
            video: vec![0x5a; VIDEO_PAYLOAD].into(),
            audio: vec![0xa5; AUDIO_PAYLOAD].into(),
            storm: None,
            forced_keyframes: 0,
        };
        // Media starts now, not when each source was set up (no catch-up burst), and the
        // sources' frame phases and periodic keyframes are spread over their intervals as
        // independent cameras' are.
        let now = Instant::now();
        let count = m.sources.len().max(1) as u32;
        for (i, (_, s)) in m.sources.iter_mut().enumerate() {
            let i = i as u32;
            s.next = now + s.interval() * i / count;
            s.paced_at = s.next;
            if s.kind == MediaKind::Video {
                s.frame = u64::from(i) * KEYFRAME_EVERY / u64::from(count);
            }
        }
        for (i, p) in m.peers.iter_mut().enumerate() {
            let Some(sock) = p.socket() else {
                continue;
            };
            m.poll
                .registry()
                .register(sock, Token(i), Interest::READABLE)?;
        }
        Ok(m)
    }

    /// Runs media until every str0m peer is connected, or fails after `limit`.
    fn wait_connected(&mut self, limit: Duration, what: &str) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        while !self
            .peers
            .iter()
            .all(|p| matches!(p, Driver::Str0m(p) if p.connected))
        {
            anyhow::ensure!(Instant::now() < end, "{what}");
            self.run(Duration::from_millis(20), None);
        }
        Ok(())
    }

    /// Adds a subscriber peer while the world runs.
    fn add(&mut self, mut p: BenchPeer) -> anyhow::Result<()> {
        let idx = self.peers.len();
        self.poll
            .registry()
            .register(&mut p.socket, Token(idx), Interest::READABLE)?;
        self.peers.push(Driver::Str0m(p));
        self.sessions += 1;
        self.run(Duration::from_millis(1), None);
        Ok(())
    }

    /// Sends due media and reads what arrived, for `d`.
    fn run(&mut self, d: Duration, mut meter: Option<&mut Meter>) {
        let end = Instant::now() + d;
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if now >= end {
                return;
            }
            let mut next = end;
            for (pi, s) in &mut self.sources {
                if let Driver::Str0m(p) = &mut self.peers[*pi] {
                    s.key_wanted |= p.take_keyframe_request(s.mid);
                }
                self.forced_keyframes += s.capture(now);
                let payload = match s.kind {
                    MediaKind::Audio => &self.audio,
                    MediaKind::Video => &self.video,
                };
                while let Some((seq, ts, last)) = s.next_packet(now) {
                    match &mut self.peers[*pi] {
                        Driver::Str0m(p) => p.send(s.mid, s.pt, seq, ts, last, payload.clone()),
                        Driver::Raw(p) => p.send(s.group, seq, payload.len()),
                        Driver::Gone => {}
                    }
                }
                next = next.min(s.wake());
            }
            for p in &mut self.peers {
                if let Driver::Str0m(p) = p {
                    p.tick(now);
                }
            }
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5));
            if crate::rx::timer_reads() {
                std::thread::sleep(wait.min(crate::rx::TIMER_READ_TICK));
                let _ = self.poll.poll(&mut events, Some(Duration::ZERO));
            } else {
                let _ = self.poll.poll(&mut events, Some(wait));
            }
            for ev in events.iter() {
                match &mut self.peers[ev.token().0] {
                    Driver::Str0m(p) => p.read(meter.as_deref_mut()),
                    Driver::Raw(p) => p.read(meter.as_deref_mut()),
                    Driver::Gone => {}
                }
            }
            if let Some(storm) = &mut self.storm {
                storm.service(now, &mut self.peers, &self.poll);
                if storm.take_raw_joins() {
                    for (pi, s) in &mut self.sources {
                        if matches!(self.peers[*pi], Driver::Raw(_)) {
                            s.key_wanted = true;
                        }
                    }
                }
            }
        }
    }

    /// Warms up, then measures one window. With `metrics` (an opencalls server's HTTP
    /// address) its `/metrics` is read before and after it, outside the CPU window: the
    /// server's own send delay over the window, and its workers' load at the end.
    fn measure(
        &mut self,
        warm: Duration,
        window: Duration,
        server_pid: u32,
        metrics: Option<SocketAddr>,
    ) -> anyhow::Result<StepResult> {
        self.run(warm, None);
        let mut meter = Meter::default();
        let before = metrics.and_then(metrics_text);
        let (s0, g0) = (sys::cpu_sample(1), sys::cpu_sample(0));
        let t0 = Instant::now();
        let forced0 = self.forced_keyframes;
        self.run(window, Some(&mut meter));
        let secs = t0.elapsed().as_secs_f64();
        let forced = (self.forced_keyframes - forced0) as f64 / secs;
        let (s1, g1) = (sys::cpu_sample(1), sys::cpu_sample(0));
        let after = metrics.and_then(metrics_text);
        let server_ms = before
            .as_deref()
            .and_then(parse_send_delay)
            .zip(after.as_deref().and_then(parse_send_delay))
            .and_then(|(a, b)| send_delay_percentiles(&a, &b));
        let mut joins: Vec<f64> = self
            .peers
            .iter()
            .filter_map(|p| match p {
                Driver::Str0m(p) => p
                    .first_rtp
                    .map(|f| (f - p.join_started).as_secs_f64() * 1000.0),
                Driver::Raw(_) | Driver::Gone => None,
            })
            .collect();
        Ok(StepResult {
            out_pps: meter.packets as f64 / secs,
            server_busy_cores: sys::busy_between(s0, s1),
            server_steal: sys::steal_between(s0, s1),
            generator_busy: sys::busy_between(g0, g1),
            loss: meter.loss(),
            p50_ms: latency(&mut meter, 0.5),
            p99_ms: latency(&mut meter, 0.99),
            socket_ms: meter
                .socket_percentile(0.5)
                .zip(meter.socket_percentile(0.99)),
            server_ms,
            rss_mb: sys::rss_mb(server_pid),
            sessions: self.sessions,
            subscribed_tracks: self.subscribed_tracks,
            join_p50_ms: percentile(&mut joins, 0.5),
            join_p99_ms: percentile(&mut joins, 0.99),
            ops_per_sec: None,
            joins: None,
            join_failures: 0,
            push: None,
            forced_keyframes_per_sec: Some(forced),
            worker_load: after.as_deref().and_then(parse_worker_load),
            admits_sessions: None,
        })
    }

    /// Like [`Media::measure`] with a join storm running from the start of the warm-up:
    /// join figures cover the joins asked for inside the window (each followed to its
    /// first RTP or its timeout after the window), media figures every receiver.
    fn measure_storm(
        &mut self,
        storm: Storm,
        warm: Duration,
        window: Duration,
        server_pid: u32,
        metrics: Option<SocketAddr>,
    ) -> anyhow::Result<StepResult> {
        self.storm = Some(storm);
        let t0 = Instant::now() + warm;
        let mut r = self.measure(warm, window, server_pid, metrics)?;
        let t1 = Instant::now();
        let secs = (t1 - t0).as_secs_f64();
        if let Some(storm) = &self.storm {
            storm.stop_joining();
        }
        // Follow the window's joins to their end (RTP, or the join timeout), unmeasured.
        let end = t1 + crate::storm::JOIN_TIMEOUT + crate::storm::STAY + Duration::from_secs(1);
        while Instant::now() < end && self.storm.as_ref().is_some_and(|s| s.live() > 0) {
            self.run(Duration::from_millis(50), None);
        }
        let storm = self
            .storm
            .take()
            .ok_or_else(|| anyhow::anyhow!("storm vanished"))?;
        let in_window: Vec<_> = storm
            .records
            .iter()
            .filter(|j| j.started >= t0 && j.started < t1)
            .collect();
        let mut times: Vec<f64> = in_window
            .iter()
            .filter_map(|j| j.first_rtp.map(|f| (f - j.started).as_secs_f64() * 1000.0))
            .collect();
        let failures =
            in_window.iter().filter(|j| j.first_rtp.is_none()).count() + storm.request_failures;
        r.ops_per_sec = Some(times.len() as f64 / secs);
        r.join_p50_ms = percentile(&mut times, 0.5);
        r.join_p99_ms = percentile(&mut times, 0.99);
        r.joins = Some(in_window.len());
        r.join_failures = failures;
        Ok(r)
    }
}

/// The sending state of a str0m publisher's m-lines (Opus for audio, VP8 for video).
fn str0m_sources(
    index: usize,
    p: &BenchPeer,
    kinds: &[MediaKind],
    mids: &[Mid],
    sending: Sending,
) -> Vec<(usize, Source)> {
    kinds
        .iter()
        .zip(mids)
        .map(|(kind, mid)| {
            let codec = if *kind == MediaKind::Audio {
                Codec::Opus
            } else {
                Codec::Vp8
            };
            (index, Source::new(*kind, *mid, p.pt(codec), 0, sending))
        })
        .collect()
}

/// A subscriber joins as a Calls app makes it: `sessions/new`, `tracks/new` pulling `items`,
/// the client's answer through `renegotiate`; more items than Calls allows per request
/// (`MAX_TRACKS_PER_REQUEST`, 64) take one such round per 64. Returns the session id and the pulled mids.
pub fn pull_session(
    api: &Api,
    p: &mut BenchPeer,
    items: Vec<Value>,
) -> anyhow::Result<(String, Vec<String>)> {
    let r = api.send("POST", "sessions/new", None);
    anyhow::ensure!(r.status == 201, "sessions/new failed: {}", r.body);
    let session = r.json()["sessionId"].as_str().unwrap_or("").to_string();
    let mut mids = Vec::new();
    for chunk in items.chunks(opencalls_api::MAX_TRACKS_PER_REQUEST) {
        let r = api.send(
            "POST",
            &format!("sessions/{session}/tracks/new"),
            Some(&json!({ "tracks": chunk })),
        );
        anyhow::ensure!(r.status == 200, "pull failed: {}", r.body);
        let body = r.json();
        if let Some(ts) = body["tracks"].as_array() {
            mids.extend(
                ts.iter()
                    .filter_map(|t| t["mid"].as_str().map(str::to_string)),
            );
        }
        let answer = p.accept_offer(body["sessionDescription"]["sdp"].as_str().unwrap_or(""))?;
        let r = api.send(
            "PUT",
            &format!("sessions/{session}/renegotiate"),
            Some(&json!({"sessionDescription": {"type": "answer", "sdp": answer}})),
        );
        anyhow::ensure!(r.status == 200, "renegotiate failed: {}", r.body);
    }
    Ok((session, mids))
}

struct OpencallsWorld {
    server: Proc,
    media: Media,
    api: Api,
    /// Per publisher: its session id and track names.
    names: Vec<(String, Vec<String>)>,
}

impl OpencallsWorld {
    fn build(t: Topology, idle_secs: u64) -> anyhow::Result<OpencallsWorld> {
        let (server, api) = start_opencalls(idle_secs)?;
        let mut peers = Vec::new();
        let mut sources = Vec::new();
        let mut names: Vec<(String, Vec<String>)> = Vec::new();
        for (i, kinds) in t.publishers.iter().enumerate() {
            let mut p = BenchPeer::new(peers.len(), false, media_ip())?;
            let session = api.new_session();
            let (offer, mids) = p.offer_send(kinds);
            let tracks: Vec<Value> = mids
                .iter()
                .enumerate()
                .map(|(k, m)| json!({"location": "local", "mid": m.to_string(), "trackName": format!("p{i}t{k}")}))
                .collect();
            let r = api.send(
                "POST",
                &format!("sessions/{session}/tracks/new"),
                Some(&json!({"sessionDescription": {"type": "offer", "sdp": offer}, "tracks": tracks})),
            );
            anyhow::ensure!(r.status == 200, "push failed: {}", r.body);
            p.accept_answer(r.json()["sessionDescription"]["sdp"].as_str().unwrap_or(""))?;
            sources.extend(str0m_sources(peers.len(), &p, kinds, &mids, t.sending));
            names.push((
                session,
                (0..kinds.len()).map(|k| format!("p{i}t{k}")).collect(),
            ));
            peers.push(Driver::Str0m(p));
        }
        let mut media = Media::new(peers, sources, t.publishers.len(), 0)?;
        // Publishers connect and start sending before anyone subscribes.
        media.wait_connected(Duration::from_secs(10), "publishers did not connect")?;
        let mut subscribed = 0;
        for pulls in &t.subscribers {
            let mut p = BenchPeer::new(media.peers.len(), true, media_ip())?;
            let items: Vec<Value> = pulls
                .iter()
                .map(|(pi, k)| json!({"location": "remote", "sessionId": names[*pi].0, "trackName": names[*pi].1[*k]}))
                .collect();
            pull_session(&api, &mut p, items)?;
            subscribed += pulls.len();
            media.add(p)?;
        }
        media.subscribed_tracks = subscribed;
        media.wait_connected(Duration::from_secs(20), "subscribers did not connect")?;
        Ok(OpencallsWorld {
            server,
            media,
            api,
            names,
        })
    }
}

struct RawWorld {
    relay: Proc,
    relay_addr: SocketAddr,
    media: Media,
}

impl RawWorld {
    fn build(t: Topology) -> anyhow::Result<RawWorld> {
        let port = free_port()?;
        let me = std::env::current_exe()?;
        let relay = spawn_pinned(
            1,
            &me,
            &[
                "relay".into(),
                "--port".into(),
                port.to_string(),
                "--seconds".into(),
                "120".into(),
                "--ip".into(),
                media_ip().to_string(),
            ],
        )?;
        let relay_addr = SocketAddr::new(media_ip(), port);
        std::thread::sleep(Duration::from_millis(200));
        let mut peers = Vec::new();
        let mut sources = Vec::new();
        for (i, kinds) in t.publishers.iter().enumerate() {
            let p = crate::raw_client::RawPeer::new(peers.len(), relay_addr)?;
            for (k, kind) in kinds.iter().enumerate() {
                let group = (i * 4 + k) as u32;
                let source = Source::new(*kind, Mid::from("raw"), 0, group, t.sending);
                sources.push((peers.len(), source));
            }
            peers.push(Driver::Raw(p));
        }
        let mut subscribed = 0;
        for pulls in &t.subscribers {
            let mut p = crate::raw_client::RawPeer::new(peers.len(), relay_addr)?;
            for (pi, k) in pulls {
                p.subscribe((pi * 4 + k) as u32)?;
            }
            subscribed += pulls.len();
            peers.push(Driver::Raw(p));
        }
        let sessions = t.publishers.len() + t.subscribers.len();
        let media = Media::new(peers, sources, sessions, subscribed)?;
        Ok(RawWorld {
            relay,
            relay_addr,
            media,
        })
    }
}

/// One api phase: requests per second, the server's (busy, stolen) share of its core, the
/// generator's busy share, and each round's latency in ms.
type Phase = (f64, (f64, f64), f64, Vec<f64>);

/// Two phases from one client, as fast as it can ask: `n` bare `sessions/new` (the rate the
/// goal names, `sessions_per_sec`), then `n` rounds of `sessions/new` + `tracks/new` pushing
/// an audio+video offer (`push_per_sec`; its latency is the step's p50/p99).
fn api_step(step: &Step, _quick: bool) -> anyhow::Result<StepResult> {
    let (server, api) = start_opencalls(600)?;
    let mut peer = BenchPeer::new(0, false, media_ip())?;
    let (offer, mids) = peer.offer_send(&[MediaKind::Audio, MediaKind::Video]);
    let body = json!({"sessionDescription": {"type": "offer", "sdp": offer},
        "tracks": mids.iter().enumerate().map(|(k, m)| json!({"location": "local", "mid": m.to_string(), "trackName": format!("t{k}")})).collect::<Vec<_>>()});
    let phase = |with_push: bool| -> anyhow::Result<Phase> {
        let mut lat = Vec::with_capacity(step.n);
        let (s0, g0) = (sys::cpu_sample(1), sys::cpu_sample(0));
        let t0 = Instant::now();
        for _ in 0..step.n {
            let t = Instant::now();
            let r = api.send("POST", "sessions/new", None);
            anyhow::ensure!(r.status == 201, "sessions/new failed: {}", r.body);
            if with_push {
                let session = r.json()["sessionId"].as_str().unwrap_or("").to_string();
                let r = api.send(
                    "POST",
                    &format!("sessions/{session}/tracks/new"),
                    Some(&body),
                );
                anyhow::ensure!(r.status == 200, "tracks/new failed: {}", r.body);
            }
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let rate = step.n as f64 / t0.elapsed().as_secs_f64();
        let (s1, g1) = (sys::cpu_sample(1), sys::cpu_sample(0));
        Ok((
            rate,
            (sys::busy_between(s0, s1), sys::steal_between(s0, s1)),
            sys::busy_between(g0, g1),
            lat,
        ))
    };
    let (new_rate, (new_busy, new_steal), new_gen, _) = phase(false)?;
    let (push_rate, (push_busy, _), push_gen, mut lat) = phase(true)?;
    Ok(StepResult {
        out_pps: 0.0,
        server_busy_cores: new_busy,
        server_steal: new_steal,
        generator_busy: new_gen.max(push_gen),
        loss: 0.0,
        p50_ms: percentile(&mut lat, 0.5),
        p99_ms: percentile(&mut lat, 0.99),
        socket_ms: None,
        server_ms: None,
        rss_mb: sys::rss_mb(server.id()),
        sessions: 2 * step.n,
        subscribed_tracks: 0,
        join_p50_ms: None,
        join_p99_ms: None,
        ops_per_sec: Some(new_rate),
        joins: None,
        join_failures: 0,
        push: Some((push_rate, push_busy)),
        forced_keyframes_per_sec: None,
        worker_load: None,
        admits_sessions: None,
    })
}

/// Janus 1.1.2 VideoRoom: one room, each publisher a feed, each subscriber one
/// PeerConnection per feed it pulls (Janus's subscriber handles are per feed).
struct JanusWorld {
    media: Media,
    // Dropped after `media`: the client's session keeps the PeerConnections up.
    client: Arc<crate::janus::JanusClient>,
    room: u64,
    feeds: Vec<u64>,
    server: crate::janus::JanusServer,
}

impl JanusWorld {
    fn build(t: Topology) -> anyhow::Result<JanusWorld> {
        let port = free_port()?;
        let server = crate::janus::JanusServer::start(port, media_ip(), Some(1))?;
        let client = Arc::new(crate::janus::JanusClient::connect(port)?);
        let room = client.create_room(t.publishers.len() as u32 + 1)?;
        let mut peers = Vec::new();
        let mut sources = Vec::new();
        let mut feeds = Vec::new();
        for (i, kinds) in t.publishers.iter().enumerate() {
            let mut p = BenchPeer::new(peers.len(), false, media_ip())?;
            let (offer, mids) = p.offer_send(kinds);
            let (answer, feed) = client.publish(room, &format!("p{i}"), &offer)?;
            p.accept_answer(&answer)?;
            sources.extend(str0m_sources(peers.len(), &p, kinds, &mids, t.sending));
            feeds.push(feed);
            peers.push(Driver::Str0m(p));
        }
        let mut media = Media::new(peers, sources, t.publishers.len(), 0)?;
        media.wait_connected(
            Duration::from_secs(10),
            "publishers did not connect to janus",
        )?;
        let mut subscribed = 0;
        for pulls in &t.subscribers {
            let mut wanted: Vec<usize> = pulls.iter().map(|(p, _)| *p).collect();
            wanted.dedup();
            for pi in wanted {
                let mut p = BenchPeer::new(media.peers.len(), true, media_ip())?;
                let (handle, offer) = subscribe_when_live(&client, &mut media, room, feeds[pi])?;
                let answer = p.accept_offer(&offer)?;
                client.start_subscriber(handle, &answer)?;
                media.add(p)?;
            }
            subscribed += pulls.len();
        }
        media.subscribed_tracks = subscribed;
        media.wait_connected(
            Duration::from_secs(30),
            "subscribers did not connect to janus",
        )?;
        Ok(JanusWorld {
            media,
            client,
            room,
            feeds,
            server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_load_is_the_busiest_workers() {
        let text =
            "# TYPE opencalls_worker_load gauge\nopencalls_worker_load{worker=\"0\"} 0.412\n\
            opencalls_worker_load{worker=\"1\"} 0.970\nopencalls_sessions{worker=\"1\"} 7\n";
        assert_eq!(parse_worker_load(text), Some(0.97));
        assert_eq!(
            parse_worker_load("opencalls_sessions{worker=\"0\"} 3\n"),
            None
        );
    }

    #[test]
    fn send_delay_sums_workers_and_reads_percentiles_between_two_readings() {
        let text = |a: [u64; 4], b: [u64; 4]| {
            let mut t = String::from("# TYPE opencalls_send_delay_seconds histogram\n");
            for (w, c) in [(0, a), (1, b)] {
                for (le, n) in ["0.0001", "0.001", "0.01", "+Inf"].iter().zip(c) {
                    t += &format!(
                        "opencalls_send_delay_seconds_bucket{{worker=\"{w}\",le=\"{le}\"}} {n}\n"
                    );
                }
                t += &format!(
                    "opencalls_send_delay_seconds_count{{worker=\"{w}\"}} {}\n",
                    c[3]
                );
            }
            t
        };
        let before = parse_send_delay(&text([10, 10, 10, 10], [0, 0, 0, 0])).unwrap();
        assert_eq!(
            before,
            [(0.1, 10), (1.0, 10), (10.0, 10), (f64::INFINITY, 10)]
        );
        // In the window: 50 within 0.1 ms, 49 more within 1 ms, 1 within 10 ms.
        let after = parse_send_delay(&text([40, 80, 80, 80], [20, 29, 30, 30])).unwrap();
        let (p50, p99) = send_delay_percentiles(&before, &after).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "p50 {p50}");
        assert!((p99 - 1.0).abs() < 1e-9, "p99 {p99}");
        // Halfway into a bucket interpolates; nothing new reads as nothing.
        let after = parse_send_delay(&text([10, 110, 110, 110], [0; 4])).unwrap();
        let (p50, _) = send_delay_percentiles(&before, &after).unwrap();
        assert!((p50 - 0.55).abs() < 1e-9, "p50 {p50}");
        assert_eq!(send_delay_percentiles(&before, &before), None);
        assert_eq!(parse_send_delay("opencalls_tx_datagrams_total 5\n"), None);
    }

    fn source(kind: MediaKind, sending: Sending, t0: Instant) -> Source {
        let mut s = Source::new(kind, Mid::from("m"), 96, 0, sending);
        s.next = t0;
        s.paced_at = t0;
        s
    }

    /// Every packet that leaves by `until`, polling each 250 µs: (time, seq, ts, marker).
    fn run(s: &mut Source, t0: Instant, until: Duration) -> Vec<(Duration, u64, u32, bool)> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t <= until {
            s.capture(t0 + t);
            while let Some((seq, ts, last)) = s.next_packet(t0 + t) {
                out.push((t, seq, ts, last));
            }
            t += Duration::from_micros(250);
        }
        out
    }

    #[test]
    fn a_paced_frame_leaves_a_packet_per_gap_with_the_marker_on_its_last() {
        let t0 = Instant::now();
        let mut s = source(MediaKind::Video, Sending::Paced, t0);
        s.frame = 1; // a delta frame: 6 packets
        let sent = run(&mut s, t0, Duration::from_millis(20));
        let frame: Vec<_> = sent.iter().filter(|p| p.2 == 3000).collect();
        assert_eq!(frame.len(), 6);
        for (k, p) in frame.iter().enumerate() {
            assert_eq!(p.1, 1 + k as u64, "sequence numbers in order");
            assert_eq!(p.3, k == 5, "marker on the last packet only");
            let at = PACING_GAP * k as u32;
            assert!(
                p.0 >= at && p.0 < at + Duration::from_micros(250),
                "{:?}",
                p.0
            );
        }
        assert_eq!(s.wake(), t0 + s.interval(), "idle until the next frame");
    }

    #[test]
    fn burst_sends_a_whole_frame_at_once_and_audio_is_never_paced() {
        let t0 = Instant::now();
        let mut v = source(MediaKind::Video, Sending::Burst, t0);
        let sent = run(&mut v, t0, Duration::from_millis(1));
        assert_eq!(
            sent.len(),
            KEYFRAME_PACKETS,
            "frame 0 is a periodic keyframe"
        );
        assert!(sent.iter().all(|p| p.0 == Duration::ZERO));
        let mut a = source(MediaKind::Audio, Sending::Paced, t0);
        let sent = run(&mut a, t0, Duration::from_millis(50));
        let times: Vec<_> = sent.iter().map(|p| p.0.as_millis()).collect();
        assert_eq!(times, [0, 20, 40]);
        assert!(sent.iter().all(|p| p.3));
    }

    #[test]
    fn an_asked_for_keyframe_comes_at_the_next_frame_and_at_most_every_500_ms() {
        let t0 = Instant::now();
        let mut s = source(MediaKind::Video, Sending::Burst, t0);
        s.frame = 1;
        let frame_sizes = |s: &mut Source, at: Duration| -> Vec<usize> {
            s.capture(t0 + at);
            let mut sizes = vec![0];
            while let Some((_, _, last)) = s.next_packet(t0 + at) {
                *sizes.last_mut().unwrap() += 1;
                if last {
                    sizes.push(0);
                }
            }
            sizes.pop();
            sizes
        };
        assert_eq!(frame_sizes(&mut s, Duration::ZERO), [6]);
        s.key_wanted = true;
        assert_eq!(s.capture(t0 + Duration::from_millis(34)), 1);
        let mut n = 0;
        while s.next_packet(t0 + Duration::from_millis(34)).is_some() {
            n += 1;
        }
        assert_eq!(n, KEYFRAME_PACKETS, "the next frame is a keyframe");
        // Asked again at once: not before 500 ms after the last one.
        s.key_wanted = true;
        assert_eq!(frame_sizes(&mut s, Duration::from_millis(400)), vec![6; 11]);
        // The first frame 500 ms after the last asked-for keyframe (at 33.3 ms) is at 566.7.
        assert_eq!(
            frame_sizes(&mut s, Duration::from_millis(600)),
            [6, 6, 6, 6, KEYFRAME_PACKETS, 6]
        );
        assert!(!s.key_wanted);
    }
}
