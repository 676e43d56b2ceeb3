//! Media workers: one OS thread per core, each owning its UDP sockets and its sessions.
//!
//! A worker waits on its sockets and its inbox (commands from the control plane, media and
//! control messages from other workers) with `mio`. Per datagram it looks up the source
//! address (known 5-tuple) or, for an unknown address, the STUN username's ufrag; anything
//! else is dropped and counted before it reaches str0m. Timers sit in a binary heap, so
//! only sessions whose deadline passed are woken.
//!
//! Forwarding: the publisher's worker sends one message per destination worker (never per
//! subscriber); the destination fans the packet out to its own subscribers. Keyframe
//! requests travel back the same way and are paced per publication.
//!
//! Invariant: no code path here visits every session per packet; only the housekeeping
//! tick (twice a second) walks all sessions of one worker.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::batch::{Inbox, Outbox};
use crate::command::*;
use crate::delay::DelayHistogram;
use crate::forward::Recent;
use crate::load::LoadMeter;
use crate::peer::{
    CaptureTime, CodecSpec, EndToEnd, Flow, Kind, Mid, NewMedia, PeerError, PeerEvent, PeerOutput,
    Received, Rid, RtpRef,
};
use crate::session::{LineRun, Publication, Session, SharedSubscription, Subscription, TrackSlot};
use crate::stun;
use crate::timers::Timers;

const WAKER: Token = Token(usize::MAX);
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// Housekeeping ticks a worker counts as saturated after the kernel dropped datagrams at its
/// sockets: the tick that saw the drops and the next, 0.5 to 1 s.
const SATURATED_TICKS: u8 = 2;
/// How late a worker with nothing to read may wake for a future str0m deadline or
/// housekeeping. Those deadlines are RTCP reports, feedback and keepalives, none of which
/// needs millisecond precision; with the slack most of them run in a turn that datagrams
/// woke anyway instead of waking the thread on their own (each wakeup of an idle core costs
/// far more than the work it does). Due-now work (a session str0m must run for a packet
/// just written) never waits for it.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// Where a worker listens.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Address to bind (worker k binds port + k unless the port is 0).
    pub bind: SocketAddr,
    /// Address to advertise in the host candidate (public IP behind 1:1 NAT).
    pub advertise: IpAddr,
}

/// Lifetimes of things nobody closes explicitly (calls-api.md §8).
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// A session whose transport never came up, counted from its last negotiation.
    pub unconnected: Duration,
    /// A session whose client vanished.
    pub disconnected: Duration,
    /// A publication that receives no media.
    pub track_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            unconnected: Duration::from_secs(30),
            disconnected: Duration::from_secs(30),
            track_idle: Duration::from_secs(30),
        }
    }
}

/// How the media plane is laid out.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Number of worker threads.
    pub workers: usize,
    /// Sockets of each worker.
    pub endpoints: Vec<Endpoint>,
    /// Expiry rules.
    pub timeouts: Timeouts,
    /// Which AES-GCM seals the egress path's packets (settled once per process, see
    /// [`crate::select_aes_gcm`]).
    pub aes_gcm: crate::AesGcm,
}

/// Counters a worker keeps (read with relaxed loads, written only by the worker).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Datagrams received.
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent.
    pub tx_datagrams: AtomicU64,
    /// Datagrams dropped before str0m: unknown source and not a matching STUN request.
    pub dropped_unknown: AtomicU64,
    /// Datagrams str0m rejected.
    pub dropped_invalid: AtomicU64,
    /// Datagrams the kernel would not take.
    pub dropped_send: AtomicU64,
    /// RTP packets forwarded to subscribers.
    pub forwarded_rtp: AtomicU64,
    /// Of those, packets sealed and sent without str0m (egress path).
    pub egress_rtp: AtomicU64,
    /// Sequence numbers subscribers' NACKs asked for on the egress path (each NACK
    /// entry counted once per asking, answered or not).
    pub egress_nacked: AtomicU64,
    /// Retransmissions (RTX) the egress path sent in answer to NACKs.
    pub egress_rtx: AtomicU64,
    /// Sequence numbers the receive path beside str0m NACKed to publishers (each asking).
    pub ingress_nacked: AtomicU64,
    /// Publishers' retransmissions it unwrapped into their streams.
    pub ingress_rtx: AtomicU64,
    /// Transport-cc feedback packets it sent to publishers.
    pub ingress_feedback: AtomicU64,
    /// Authentic publisher packets it did not forward because they were already delivered.
    pub ingress_duplicates: AtomicU64,
    /// Sessions closed because of a panic.
    pub crashed_sessions: AtomicU64,
    /// Sessions currently on the worker.
    pub sessions: AtomicUsize,
    /// The worker's busy share of wall time in per mille ([`crate::load`]), smoothed over
    /// about a second and updated at each housekeeping tick.
    pub load_permille: AtomicU32,
    /// Datagrams the kernel dropped at the worker's sockets, their receive queues full (read
    /// at each housekeeping tick).
    pub receive_drops: AtomicU64,
    /// The kernel dropped datagrams at the worker's sockets within the last second or so:
    /// the worker is not keeping up, and a new session's handshake would drown there.
    pub saturated: AtomicBool,
    /// Control commands handled (SDP work among them).
    pub commands: AtomicU64,
    /// Microseconds the worker spent on control commands, in total.
    pub command_us: AtomicU64,
    /// The longest a single command held the worker, in microseconds.
    pub command_us_max: AtomicU64,
    /// For each datagram sent in answer to a read (forwarded RTP above all), the time from
    /// that read to the end of the send call that carried it: what the media plane adds to
    /// a packet's latency, but for the wait in the socket before the read. A copy another
    /// worker passed on counts from the publishing worker's read; the other datagrams of
    /// its flush count from there too.
    pub send_delay: DelayHistogram,
}

/// The control plane's handle on one worker.
#[derive(Clone)]
pub struct WorkerHandle {
    index: WorkerIndex,
    inbox: Sender<Msg>,
    waker: Arc<Waker>,
    candidates: Vec<SocketAddr>,
    stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    /// This worker's index.
    pub fn index(&self) -> WorkerIndex {
        self.index
    }

    /// The host candidates sessions of this worker advertise.
    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// Counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Queues a command. False if the worker has stopped.
    pub fn send(&self, cmd: Command) -> bool {
        self.post(Msg::Command(cmd))
    }

    fn post(&self, msg: Msg) -> bool {
        if self.inbox.send(msg).is_err() {
            return false;
        }
        self.waker.wake().is_ok()
    }
}

/// All media workers of the process.
pub struct MediaPlane {
    workers: Vec<WorkerHandle>,
    joins: Vec<JoinHandle<()>>,
}

impl MediaPlane {
    /// Binds every worker's sockets and starts the threads.
    pub fn start(config: MediaConfig, events: Sender<MediaEvent>) -> io::Result<MediaPlane> {
        let aes = crate::select_aes_gcm(config.aes_gcm);
        match (aes.ring_ns, aes.aws_lc_ns) {
            (Some(ring), Some(aws_lc)) => tracing::info!(
                "AES-GCM for SRTP beside str0m: {}{} (per 1,100-byte seal: ring {ring:.0} ns, \
                 aws-lc-rs {aws_lc:.0} ns)",
                aes.library.name(),
                aes.wide_library().map_or(String::new(), |wide| format!(
                    ", {} for fan-outs of {} subscribers or more",
                    wide.name(),
                    crate::peer::WIDE_FAN_OUT
                ))
            ),
            _ => tracing::info!("AES-GCM for SRTP beside str0m: {}", aes.library.name()),
        }
        let n = config.workers.max(1);
        let mut built = Vec::with_capacity(n);
        for k in 0..n {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let mut sockets = Vec::new();
            for (i, ep) in config.endpoints.iter().enumerate() {
                let mut bind = ep.bind;
                if bind.port() != 0 {
                    let port = u16::try_from(usize::from(bind.port()) + k).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidInput, "UDP port out of range")
                    })?;
                    bind.set_port(port);
                }
                let mut sock = UdpSocket::from_std(bind_udp(bind)?);
                poll.registry()
                    .register(&mut sock, Token(i), Interest::READABLE)?;
                let advertised = SocketAddr::new(ep.advertise, sock.local_addr()?.port());
                sockets.push((sock, advertised));
            }
            let (tx, rx) = crossbeam_channel::unbounded();
            built.push((poll, waker, sockets, tx, rx));
        }
        let handles: Vec<WorkerHandle> = built
            .iter()
            .enumerate()
            .map(|(k, (_, waker, sockets, tx, _))| WorkerHandle {
                index: k,
                inbox: tx.clone(),
                waker: waker.clone(),
                candidates: sockets.iter().map(|(_, a)| *a).collect(),
                stats: Arc::new(WorkerStats::default()),
            })
            .collect();
        let mut joins = Vec::new();
        for (k, (poll, _, sockets, _, rx)) in built.into_iter().enumerate() {
            let peers = handles.clone();
            let stats = handles[k].stats.clone();
            let events = events.clone();
            let timeouts = config.timeouts.clone();
            let join = std::thread::Builder::new()
                .name(format!("media-{k}"))
                .spawn(move || {
                    // Built on its own thread: the worker's syscall batches are not Send.
                    let (sockets, advertised) = sockets.into_iter().unzip();
                    let worker = Worker {
                        index: k,
                        poll,
                        sockets,
                        advertised,
                        inbox: rx,
                        peers,
                        events,
                        stats,
                        timeouts,
                        sessions: FxHashMap::default(),
                        by_addr: HashMap::new(),
                        by_ufrag: HashMap::new(),
                        publications: FxHashMap::default(),
                        subscribers: FxHashMap::default(),
                        timers: Timers::new(Instant::now()),
                        firing: Vec::new(),
                        receive_drops: Some(0),
                        saturated_ticks: 0,
                        egress_due: Vec::new(),
                        nacks: Vec::new(),
                        pending: Vec::new(),
                        held: Vec::new(),
                        kept: Vec::new(),
                        gso_lines: Vec::new(),
                        deferred_keyframes: FxHashSet::default(),
                        tally: Tally::default(),
                        outbox: Outbox::new(),
                        queue: VecDeque::new(),
                        closing: Vec::new(),
                        read_at: None,
                        running: true,
                    };
                    worker.run()
                })?;
            joins.push(join);
        }
        Ok(MediaPlane {
            workers: handles,
            joins,
        })
    }

    /// Handles on the workers, by index.
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// Closes every session and joins the threads.
    pub fn shutdown(self) {
        for w in &self.workers {
            w.post(Msg::Shutdown);
        }
        for j in self.joins {
            let _ = j.join();
        }
    }
}

/// How far [`Worker::deliver_to`] got.
enum Delivered {
    All,
    /// Packet `i` was written through str0m and must leave before the rest are sealed.
    ThroughStr0m(usize),
}

/// One publication's subscribers on this worker, and the payloads recently sent to them
/// (for their retransmissions).
#[derive(Default)]
struct Fanout {
    /// Each subscriber's session, m-line and state (the same `Rc` as in its session's
    /// map: the fan-out reads it without looking it up there).
    subs: Vec<(SessionKey, Mid, SharedSubscription)>,
    recent: Recent,
}

/// Counts the fan-out keeps in the worker's own memory until the end of a delivery.
#[derive(Debug, Default)]
struct Tally {
    forwarded_rtp: u64,
    egress_rtp: u64,
}

/// A pending packet's track and its place among the worker's pending packets.
type Held = (TrackKey, u32);

/// A packet on its way from a publication to subscribers on one worker: held by value (each
/// worker it goes to gets its own copy of these few fields), so the payload's buffer is the
/// packet's only allocation.
#[derive(Debug, Clone)]
struct Forwarded {
    codec: Option<CodecSpec>,
    rid: Option<Rid>,
    seq: u64,
    rtp_time: u32,
    marker: bool,
    ext: EndToEnd,
    /// `ext`'s capture time as our egress path writes it.
    abs_capture_time: Option<CaptureTime>,
    payload: Arc<[u8]>,
    /// When the publishing worker read the datagram that brought it (for `send_delay`).
    read_at: Instant,
}

enum Msg {
    Command(Command),
    /// `worker` has its first subscriber of `track`.
    Attach {
        track: TrackKey,
        worker: WorkerIndex,
    },
    /// `worker` lost its last subscriber of `track`.
    Detach {
        track: TrackKey,
        worker: WorkerIndex,
    },
    Media {
        track: TrackKey,
        packet: Forwarded,
    },
    Keyframe {
        track: TrackKey,
        rid: Option<Rid>,
    },
    Unpublished {
        track: TrackKey,
    },
    Shutdown,
}

struct Worker {
    index: WorkerIndex,
    poll: Poll,
    /// The worker's media sockets; the outbox names them by index.
    sockets: Vec<UdpSocket>,
    /// For each socket, the address its host candidate advertises.
    advertised: Vec<SocketAddr>,
    inbox: Receiver<Msg>,
    peers: Vec<WorkerHandle>,
    events: Sender<MediaEvent>,
    stats: Arc<WorkerStats>,
    timeouts: Timeouts,
    // Maps keyed by ids this process assigns hash with Fx (they sit on the per-packet path);
    // maps keyed by what clients choose (addresses, ufrags) keep std's keyed hasher.
    sessions: FxHashMap<SessionKey, Session>,
    by_addr: HashMap<SocketAddr, SessionKey>,
    by_ufrag: HashMap<String, SessionKey>,
    /// Publications owned by this worker.
    publications: FxHashMap<TrackKey, (SessionKey, Mid)>,
    /// Subscribers on this worker, by publication.
    subscribers: FxHashMap<TrackKey, Fanout>,
    timers: Timers,
    /// Sessions whose timers run this turn (kept for its allocation).
    firing: Vec<SessionKey>,
    /// The kernel's receive drops at the worker's sockets when last read; `None` once the
    /// kernel did not say.
    receive_drops: Option<u64>,
    /// Housekeeping ticks left that the worker counts as saturated.
    saturated_ticks: u8,
    /// Sessions holding packets sealed beside str0m, to send at the next flush.
    egress_due: Vec<SessionKey>,
    /// Scratch: the NACKs one datagram carried.
    nacks: Vec<(Mid, u16)>,
    /// Packets for this worker's subscribers, in arrival order, delivered per track at the
    /// next flush (a subscriber's state is then visited once per input batch, not once per
    /// packet).
    pending: Vec<Forwarded>,
    /// Each pending packet's track and place, sorted at delivery: a track's packets in order
    /// of arrival, the packets themselves not moved.
    held: Vec<Held>,
    /// Scratch: where each packet of the run sits in the track's `Recent`, once kept.
    kept: Vec<Option<u64>>,
    /// Scratch for ordering a session's sealed packets (`session::gso_order`).
    gso_lines: Vec<LineRun>,
    deferred_keyframes: FxHashSet<TrackKey>,
    /// What the fan-out forwarded since it last added to `stats` (once per delivery, not
    /// per packet: an atomic add per packet fences the overlapping reads of the fan-out).
    tally: Tally,
    /// Datagrams produced since the last flush (sent with sendmmsg).
    outbox: Outbox,
    /// Peer events waiting to be acted on (draining one session may touch others).
    queue: VecDeque<(SessionKey, PeerEvent)>,
    closing: Vec<(SessionKey, CloseReason)>,
    /// When the input batch being handled was read, or the earliest read behind packets
    /// another worker passed on; `None` after the flush that sent what they produced (what
    /// timers and commands send alone is not counted in `send_delay`).
    read_at: Option<Instant>,
    running: bool,
}

/// Sends every queued datagram and counts the outcome; with `read_at`, the datagrams sent
/// count in `send_delay` as sent now.
fn flush_outbox(
    outbox: &mut Outbox,
    sockets: &[UdpSocket],
    stats: &WorkerStats,
    read_at: Option<Instant>,
) {
    let (sent, dropped) = outbox.flush(sockets);
    stats.tx_datagrams.fetch_add(sent, Ordering::Relaxed);
    stats.dropped_send.fetch_add(dropped, Ordering::Relaxed);
    if let (Some(at), 1..) = (read_at, sent) {
        stats.send_delay.observe(at.elapsed(), sent);
    }
}

/// Input batches (of up to `batch::BATCH` datagrams) a worker reads from one socket per loop
/// turn before it runs commands and timers.
const READ_BATCHES_PER_TURN: usize = 8;

/// On the egress path, one packet in this many still goes through str0m (every 20 s for
/// 20 ms audio, ~6 s for 1.5 Mbit/s video), so its sender reports keep a current RTP time:
/// str0m extrapolates it from its last write by the wall clock, which drifts from the
/// sender's media clock by parts per million (a few milliseconds over 20 s at 100 ppm; lip
/// sync tolerates tens). Each such write costs a str0m round over the whole session (every
/// m-line) and str0m's own send, ~20 µs with the session's state out of cache: at one in
/// 200 that was 5–7 % of a worker's CPU in a 32-person meeting (docs/benchmarks.md).
const EGRESS_STR0M_EVERY: u32 = 1000;

/// Subscribers whose state [`Worker::read_ahead`] reads before their packets are sealed:
/// enough for the reads to overlap, few enough (about 10 cache lines each) to stay in L1.
const READ_AHEAD: usize = 16;

fn incr(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = crate::udp::bind(addr)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// How long a worker with nothing left to read waits for its next `deadline`: not at all
/// when it is due, else until TIMER_SLACK after it.
fn poll_wait(now: Instant, deadline: Instant) -> Duration {
    if deadline <= now {
        Duration::ZERO
    } else {
        (deadline + TIMER_SLACK) - now
    }
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut inbox = Inbox::new();
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        let mut load = LoadMeter::new(Instant::now());
        let mut unread = false;
        while self.running {
            let now = Instant::now();
            let mut deadline = next_housekeeping;
            if let Some(t) = self.timers.next_wake() {
                deadline = deadline.min(t);
            }
            // A socket left unread last turn has data now: look, don't wait.
            let wait = if unread {
                Duration::ZERO
            } else {
                poll_wait(now, deadline)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.index, "poll failed: {e}");
                    break;
                }
            }
            if !wait.is_zero() {
                load.waited(now, Instant::now());
            }
            unread = false;
            for i in 0..self.sockets.len() {
                unread |= !self.read_socket(i, &mut inbox);
            }
            while let Ok(msg) = self.inbox.try_recv() {
                self.handle_msg(msg);
            }
            let now = Instant::now();
            self.fire_timers(now);
            let housekeeping = now >= next_housekeeping;
            if housekeeping {
                self.housekeeping(now);
                self.stats
                    .load_permille
                    .store(load.sample(now), Ordering::Relaxed);
                self.sample_receive_drops();
                next_housekeeping = now + HOUSEKEEPING;
            }
            self.settle();
            self.flush();
            if housekeeping {
                self.outbox.trim();
            }
        }
        let keys: Vec<SessionKey> = self.sessions.keys().copied().collect();
        for key in keys {
            self.close_session(key, CloseReason::Shutdown);
        }
    }

    /// Reads the kernel's drop counts of the worker's sockets; the worker counts as saturated
    /// for [`SATURATED_TICKS`] housekeeping ticks after one rose.
    fn sample_receive_drops(&mut self) {
        let Some(before) = self.receive_drops else {
            return;
        };
        let total: Option<u64> = self.sockets.iter().map(crate::udp::receive_drops).sum();
        let Some(total) = total else {
            // Asked once: where the kernel does not say, it will not say later either.
            tracing::warn!(
                worker = self.index,
                "the kernel does not report drops at media sockets; admission goes by load only"
            );
            self.receive_drops = None;
            return;
        };
        self.saturated_ticks = if total > before {
            SATURATED_TICKS
        } else {
            self.saturated_ticks.saturating_sub(1)
        };
        self.receive_drops = Some(total);
        self.stats.receive_drops.store(total, Ordering::Relaxed);
        self.stats
            .saturated
            .store(self.saturated_ticks > 0, Ordering::Relaxed);
    }

    /// Reads the socket a batch at a time, flushing replies after each batch, until it is
    /// dry (returns true) or `READ_BATCHES_PER_TURN` batches were read (false: the caller
    /// comes back without waiting). The bound keeps an overloaded worker turning: commands,
    /// str0m timers (which release most forwarded packets) and housekeeping run every turn
    /// however fast datagrams arrive. A batch that did not fill its buffers emptied the
    /// socket's queue ([`Inbox::drained`]): no further read to confirm it.
    fn read_socket(&mut self, i: usize, inbox: &mut Inbox) -> bool {
        for _ in 0..READ_BATCHES_PER_TURN {
            let n = match inbox.read(&self.sockets[i]) {
                Ok(0) if inbox.drained() => return true,
                Ok(0) => continue,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surface here on Linux; they concern one peer only.
                Err(_) => continue,
            };
            self.read_at = Some(Instant::now());
            self.stats
                .rx_datagrams
                .fetch_add(n as u64, Ordering::Relaxed);
            let destination = self.advertised[i];
            for k in 0..n {
                let (data, source) = inbox.datagram(k);
                self.handle_datagram(source, destination, data);
                self.settle();
            }
            self.flush();
            if inbox.drained() {
                return true;
            }
        }
        false
    }

    /// Delivers pending packets and sends every queued datagram. Every session's sealed
    /// packets are queued by then, so the outbox's buffer is reused from the start. Ends
    /// the input batch, if one was being handled.
    fn flush(&mut self) {
        self.deliver_pending();
        self.release_egress();
        flush_outbox(&mut self.outbox, &self.sockets, &self.stats, self.read_at);
        self.outbox.recycle();
        self.read_at = None;
    }

    /// Queues the packets sealed beside str0m, one session after another.
    fn release_egress(&mut self) {
        let mut due = std::mem::take(&mut self.egress_due);
        for key in due.drain(..) {
            self.release_session_egress(key);
        }
        self.egress_due = due;
    }

    /// Queues one session's packets sealed beside str0m.
    fn release_session_egress(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some((sock, to)) = s.send_path else {
            s.egress_out.clear();
            return;
        };
        for d in s.egress_out.drain(&mut self.gso_lines) {
            if !self.outbox.queue(sock, to, d) {
                incr(&self.stats.dropped_send);
            }
            if self.outbox.is_full() {
                flush_outbox(&mut self.outbox, &self.sockets, &self.stats, self.read_at);
            }
        }
    }

    fn handle_datagram(&mut self, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        // A binding request names its session by ufrag. It wins over the address map: a
        // client address can come back as a new PeerConnection of another session (a port
        // the OS or a NAT hands out again) while the old session still holds the address.
        let by_ufrag = stun::looks_like_stun(data)
            .then(|| stun::binding_request_ufrag(data))
            .flatten()
            .and_then(|ufrag| self.by_ufrag.get(ufrag).copied());
        let Some(key) = by_ufrag.or_else(|| self.by_addr.get(&source).copied()) else {
            tracing::trace!(%source, len = data.len(), "dropped: unknown source");
            incr(&self.stats.dropped_unknown);
            return;
        };
        let now = Instant::now();
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            session
                .peer
                .handle_receive(now, source, destination, data, &mut self.nacks)
        }));
        match result {
            Ok(Ok(Received::Str0m)) => {}
            Ok(Ok(received)) => {
                // The receive path beside str0m took it: nothing for str0m to drain, only
                // its feedback timer to keep (an earlier wake than the session's is kept).
                match received {
                    Received::Rtp(rtp) => self.queue.push_back((key, PeerEvent::Rtp(rtp))),
                    Received::Dropped => incr(&self.stats.dropped_invalid),
                    Received::Kept | Received::Str0m => {}
                }
                if let Some(t) = session.peer.ingress_deadline() {
                    self.timers.schedule(key, &mut session.timer, t);
                }
                return;
            }
            Ok(Err(_)) => incr(&self.stats.dropped_invalid),
            Err(_) => {
                self.closing.push((key, CloseReason::Crashed));
                return;
            }
        }
        // NACKs on m-lines whose retransmissions are ours (video on the egress path; str0m
        // answers the others from its own buffer).
        if session.send_path.is_some() && !self.nacks.is_empty() {
            self.answer_nacks(key);
        }
        self.drain(key);
    }

    /// Retransmits the packets the NACKs just read (`self.nacks`) ask for.
    fn answer_nacks(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let mut nacks = std::mem::take(&mut self.nacks);
        self.stats
            .egress_nacked
            .fetch_add(nacks.len() as u64, Ordering::Relaxed);
        for &(mid, seq) in &nacks {
            let Some(sub) = s.subscriptions.get(&mid) else {
                continue;
            };
            let mut guard = sub.borrow_mut();
            let sub = &mut *guard;
            let Some((_, Some(stream))) = &sub.egress else {
                continue;
            };
            let Some((seq, sent)) = sub.history.resend(seq) else {
                continue;
            };
            let recent = self.subscribers.get(&sub.source).map(|f| &f.recent);
            let Some(kept) = recent.and_then(|r| r.get(sent.packet)) else {
                continue;
            };
            let packet = RtpRef {
                pt: sent.pt,
                seq,
                rtp_time: kept.rtp_time.wrapping_add(sent.ts_offset),
                marker: kept.marker,
                payload: kept.payload,
            };
            let sealed = self
                .outbox
                .write(|buf| s.peer.seal_rtx(buf, stream, packet));
            if let Some(datagram) = sealed {
                incr(&self.stats.egress_rtx);
                if s.egress_out.push(datagram, mid) {
                    self.egress_due.push(key);
                }
            }
        }
        nacks.clear();
        self.nacks = nacks;
    }

    /// Drains one session's output: sends datagrams, queues events, re-arms its timer.
    fn drain(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        loop {
            let out = match catch_unwind(AssertUnwindSafe(|| session.peer.poll())) {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => {
                    tracing::debug!(session = key.0, "peer failed: {e}");
                    self.closing.push((key, CloseReason::Disconnected));
                    return;
                }
                Err(_) => {
                    self.closing.push((key, CloseReason::Crashed));
                    return;
                }
            };
            match out {
                PeerOutput::Transmit {
                    destination,
                    source,
                    contents,
                } => {
                    if stun::is_binding_success(&contents) && !session.addrs.contains(&destination)
                    {
                        // str0m answered a request whose integrity it checked: the address
                        // belongs to this session from now on.
                        session.addrs.push(destination);
                        self.by_addr.insert(destination, key);
                    }
                    let sock = self
                        .advertised
                        .iter()
                        .position(|adv| *adv == source)
                        .unwrap_or(0);
                    if !stun::looks_like_stun(&contents) {
                        // DTLS, SRTP and SRTCP go to the nominated pair only.
                        session.send_path = Some((sock, destination));
                    }
                    self.outbox.push(sock, destination, &contents);
                    if self.outbox.is_full() {
                        // `session` is borrowed: flush through the fields, not `self.flush()`.
                        flush_outbox(&mut self.outbox, &self.sockets, &self.stats, self.read_at);
                    }
                }
                PeerOutput::Event(ev) => self.queue.push_back((key, ev)),
                PeerOutput::Timeout(t) => {
                    self.timers.schedule(key, &mut session.timer, t);
                    return;
                }
            }
        }
    }

    /// Acts on queued events and closes crashed sessions until nothing is left.
    fn settle(&mut self) {
        loop {
            if let Some((key, ev)) = self.queue.pop_front() {
                self.handle_event(key, ev);
            } else if let Some((key, reason)) = self.closing.pop() {
                self.close_session(key, reason);
            } else {
                return;
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        let mut firing = std::mem::take(&mut self.firing);
        self.timers.expired(now, &mut self.sessions, &mut firing);
        for key in firing.drain(..) {
            self.fire(key, now);
        }
        self.firing = firing;
    }

    /// Runs a session's str0m timers and drains what they release.
    fn fire(&mut self, key: SessionKey, now: Instant) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        match catch_unwind(AssertUnwindSafe(|| session.peer.handle_timeout(now))) {
            Ok(_) => self.drain(key),
            Err(_) => self.closing.push((key, CloseReason::Crashed)),
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let t = self.timeouts.clone();
        let mut idle_tracks = Vec::new();
        for (key, s) in &mut self.sessions {
            if let Some(c) = s.peer.take_ingress_counts() {
                let st = &self.stats;
                st.ingress_nacked.fetch_add(c.nacked, Ordering::Relaxed);
                st.ingress_rtx.fetch_add(c.rtx, Ordering::Relaxed);
                st.ingress_feedback.fetch_add(c.feedback, Ordering::Relaxed);
                st.ingress_duplicates
                    .fetch_add(c.duplicates, Ordering::Relaxed);
            }
            if !s.peer.was_connected() {
                if now.saturating_duration_since(s.last_negotiation) > t.unconnected {
                    self.closing.push((*key, CloseReason::NeverConnected));
                }
            } else if let Some(since) = s.disconnected_since {
                if now.saturating_duration_since(since) > t.disconnected {
                    self.closing.push((*key, CloseReason::Disconnected));
                }
            }
            for (mid, p) in &s.publications {
                if p.open && now.saturating_duration_since(p.last_media) > t.track_idle {
                    idle_tracks.push((*key, *mid));
                }
            }
        }
        for (key, mid) in idle_tracks {
            if let Some(name) = self.unpublish(key, mid) {
                let _ = self.events.send(MediaEvent::PublicationClosed {
                    key,
                    track_name: name,
                });
            }
        }
        let deferred: Vec<TrackKey> = self.deferred_keyframes.iter().copied().collect();
        for track in deferred {
            self.keyframe_local(track, None, now, true);
        }
    }

    fn handle_event(&mut self, key: SessionKey, ev: PeerEvent) {
        let now = Instant::now();
        match ev {
            PeerEvent::Connected | PeerEvent::Reconnected => {
                let Some(s) = self.sessions.get_mut(&key) else {
                    return;
                };
                s.disconnected_since = None;
                let wanted: Vec<(TrackKey, Option<Rid>, WorkerIndex)> = s
                    .subscriptions
                    .values()
                    .map(|sub| sub.borrow())
                    .filter(|sub| sub.open)
                    .map(|sub| (sub.source, sub.layer, sub.source_worker))
                    .collect();
                for (track, rid, w) in wanted {
                    self.request_keyframe(track, rid, w);
                }
            }
            PeerEvent::Disconnected => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.disconnected_since.get_or_insert(now);
                }
            }
            PeerEvent::Rtp(p) => {
                let Some(s) = self.sessions.get_mut(&key) else {
                    return;
                };
                let Some(publication) = s.publications.get_mut(&p.mid) else {
                    return;
                };
                if !publication.open {
                    return;
                }
                publication.last_media = now;
                let track = publication.key;
                if publication.fanout.is_empty() {
                    return;
                }
                let packet = Forwarded {
                    codec: p.codec,
                    rid: p.rid,
                    seq: p.seq,
                    rtp_time: p.rtp_time,
                    marker: p.marker,
                    ext: EndToEnd::of(&p.ext),
                    abs_capture_time: CaptureTime::of(&p.ext),
                    payload: p.payload,
                    read_at: self.read_at.unwrap_or_else(Instant::now),
                };
                for i in 0..publication.fanout.len() {
                    let w = publication.fanout[i].0;
                    if w != self.index {
                        self.peers[w].post(Msg::Media {
                            track,
                            packet: packet.clone(),
                        });
                    }
                }
                let local = publication.fanout.iter().any(|(w, _)| *w == self.index);
                if local {
                    self.hold(track, packet);
                }
            }
            PeerEvent::KeyframeRequest { mid, .. } => {
                let Some(s) = self.sessions.get(&key) else {
                    return;
                };
                let wanted = s
                    .subscriptions
                    .get(&mid)
                    .map(|sub| sub.borrow())
                    .filter(|sub| sub.open)
                    .map(|sub| (sub.source, sub.layer, sub.source_worker));
                if let Some((track, rid, w)) = wanted {
                    self.request_keyframe(track, rid, w);
                }
            }
        }
    }

    /// Fans the pending packets out, one track's packets at a time, each subscriber taking
    /// all of them in order before the next (its session, keys and history are touched once
    /// per batch). Nothing leaves earlier than before: sealed packets wait for the flush.
    fn deliver_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        self.timers.advance(now);
        let mut pending = std::mem::take(&mut self.pending);
        let mut held = std::mem::take(&mut self.held);
        // By track, then by place: each track's packets keep their order. In place, with
        // no scratch buffer, as the keys are unique.
        held.sort_unstable();
        for run in held.chunk_by(|a, b| a.0 == b.0) {
            self.deliver(run[0].0, (&pending, run), now);
        }
        pending.clear();
        held.clear();
        self.pending = pending;
        self.held = held;
        let tally = std::mem::take(&mut self.tally);
        self.stats
            .forwarded_rtp
            .fetch_add(tally.forwarded_rtp, Ordering::Relaxed);
        self.stats
            .egress_rtp
            .fetch_add(tally.egress_rtp, Ordering::Relaxed);
    }

    /// Waits for [`Worker::deliver_pending`].
    fn hold(&mut self, track: TrackKey, packet: Forwarded) {
        self.held.push((track, self.pending.len() as u32));
        self.pending.push(packet);
    }

    /// Fans the packets `run` names among `pending` (in order, all of `track`) out to this
    /// worker's subscribers of it.
    fn deliver(&mut self, track: TrackKey, (pending, run): (&[Forwarded], &[Held]), now: Instant) {
        let Some(fanout) = self.subscribers.get_mut(&track) else {
            return;
        };
        let subs = std::mem::take(&mut fanout.subs);
        let mut recent = std::mem::take(&mut fanout.recent);
        let mut kept = std::mem::take(&mut self.kept);
        kept.clear();
        kept.resize(run.len(), None);
        let mut evicted = recent.touch_evicted(run.len());
        for chunk in subs.chunks(READ_AHEAD) {
            self.read_ahead(chunk, std::mem::take(&mut evicted));
            for (key, mid, sub) in chunk {
                let (key, mid) = (*key, *mid);
                let mut from = 0;
                while from < run.len() {
                    let rest = (pending, &run[from..], &mut kept[from..]);
                    let delivered = {
                        let sub = &mut sub.borrow_mut();
                        self.deliver_to(key, mid, sub, rest, &mut recent, subs.len(), now)
                    };
                    match delivered {
                        Delivered::All => break,
                        Delivered::ThroughStr0m(i) => {
                            // A packet written through str0m on the egress path leaves now,
                            // after the packets sealed before it and before those sealed
                            // after it: out of order, a receiver would take it for lost and
                            // NACK it (video) or its jitter buffer would reorder.
                            self.release_session_egress(key);
                            self.fire(key, now);
                            from += i + 1;
                        }
                    }
                }
            }
        }
        if let Some(fanout) = self.subscribers.get_mut(&track) {
            // Nothing can subscribe while we deliver, but keep any additions anyway.
            let added = std::mem::replace(&mut fanout.subs, subs);
            fanout.subs.extend(added);
            fanout.recent = recent;
        }
        self.kept = kept;
    }

    /// Reads the state [`Worker::deliver_to`] will use for each of `subs`, so that it is in
    /// cache when their packets are sealed. A subscriber's session lies behind a hashed
    /// lookup that misses the cache at fan-out sizes (its subscription does not: the fan-out
    /// holds it); met one subscriber at a time, each miss stalls the fan-out in turn, while
    /// the reads of a few subscribers back to back here are independent and overlap.
    /// `folded` carries other such reads (`Recent::touch_evicted`) to the same sink.
    fn read_ahead(&self, subs: &[(SessionKey, Mid, SharedSubscription)], mut folded: u64) {
        for (key, _, sub) in subs {
            folded ^= sub.borrow().touch();
            if let Some(s) = self.sessions.get(key) {
                folded ^= s.touch();
            }
        }
        // The value means nothing; it keeps the compiler from dropping the loads.
        std::hint::black_box(folded);
    }

    /// Forwards the packets `run` names to one subscription, sealing beside str0m where it
    /// can; stops after a packet written through str0m that must leave before the next is
    /// sealed.
    /// `fan_out`: the track's subscribers on this worker.
    #[allow(clippy::too_many_arguments)]
    fn deliver_to(
        &mut self,
        key: SessionKey,
        mid: Mid,
        sub: &mut Subscription,
        (pending, run, kept): (&[Forwarded], &[Held], &mut [Option<u64>]),
        recent: &mut Recent,
        fan_out: usize,
        now: Instant,
    ) -> Delivered {
        let Some(s) = self.sessions.get_mut(&key) else {
            return Delivered::All;
        };
        for (i, &(_, at)) in run.iter().enumerate() {
            let packet = &pending[at as usize];
            let Some(codec) = packet.codec else {
                continue;
            };
            if !sub.wants_layer(packet.rid) {
                continue;
            }
            let pt = match sub.pt {
                Some((c, pt)) if c == codec => Some(pt),
                _ => {
                    let pt = s.peer.send_pt(mid, &codec);
                    sub.pt = pt.map(|pt| (codec, pt));
                    pt
                }
            };
            let Some(pt) = pt else {
                continue;
            };
            let Some((seq, ts)) = sub.rewriter.rewrite(packet.seq, packet.rtp_time) else {
                continue;
            };
            if s.peer.was_connected() && !matches!(sub.egress, Some((p, _)) if p == pt) {
                sub.egress = Some((pt, s.peer.egress_stream(mid, pt)));
            }
            let stream = match &sub.egress {
                Some((_, Some(stream))) => Some(stream),
                _ => None,
            };
            if stream.is_some_and(|stream| stream.resends()) {
                let index = *kept[i].get_or_insert_with(|| {
                    recent.push(packet.payload.clone(), packet.rtp_time, packet.marker)
                });
                sub.history
                    .push(seq, ts.wrapping_sub(packet.rtp_time), pt, index);
            }
            // Without str0m, except one packet in EGRESS_STR0M_EVERY (and the first): str0m's
            // sender reports take their RTP time from its last write.
            let beside = stream.filter(|_| s.send_path.is_some());
            if let Some(stream) = beside {
                if sub.egress_run > 0 && sub.egress_run < EGRESS_STR0M_EVERY {
                    let sealed = self.outbox.write(|buf| {
                        s.peer.seal_rtp(
                            buf,
                            stream,
                            pt,
                            seq,
                            ts,
                            packet.marker,
                            packet.abs_capture_time.as_ref(),
                            &packet.payload,
                            fan_out,
                        )
                    });
                    if let Some(datagram) = sealed {
                        sub.egress_run += 1;
                        self.tally.forwarded_rtp += 1;
                        self.tally.egress_rtp += 1;
                        if s.egress_out.push(datagram, mid) {
                            self.egress_due.push(key);
                        }
                        continue;
                    }
                }
                sub.egress_run = 1;
            }
            let written = s.peer.write_rtp(
                mid,
                pt,
                seq,
                ts,
                packet.marker,
                packet.ext.values(),
                packet.payload.clone(),
                now,
            );
            if written {
                self.tally.forwarded_rtp += 1;
                if beside.is_some() {
                    // Its neighbours leave beside str0m: it must leave between them.
                    return Delivered::ThroughStr0m(i);
                }
                // The packet waits in str0m's send queue until the session's next timeout
                // (see `Peer::write_rtp`): no drain now, the session is due this turn.
                self.timers.schedule(key, &mut s.timer, now);
            }
        }
        Delivered::All
    }

    fn request_keyframe(&mut self, track: TrackKey, rid: Option<Rid>, source_worker: WorkerIndex) {
        if source_worker == self.index {
            self.keyframe_local(track, rid, Instant::now(), false);
        } else {
            self.peers[source_worker].post(Msg::Keyframe { track, rid });
        }
    }

    /// A keyframe request for a publication of this worker, paced.
    fn keyframe_local(&mut self, track: TrackKey, rid: Option<Rid>, now: Instant, deferred: bool) {
        let Some((key, mid)) = self.publications.get(&track).copied() else {
            self.deferred_keyframes.remove(&track);
            return;
        };
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(p) = s.publications.get_mut(&mid) else {
            return;
        };
        let send = if deferred {
            p.pacer.poll_deferred(now)
        } else {
            p.pacer.request(now)
        };
        if p.pacer.has_deferred() {
            self.deferred_keyframes.insert(track);
        } else {
            self.deferred_keyframes.remove(&track);
        }
        if send {
            s.peer.request_keyframe(mid, rid, false);
            self.drain(key);
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        if !matches!(msg, Msg::Media { .. }) {
            // Packets that came before a change are delivered before it.
            self.deliver_pending();
        }
        match msg {
            Msg::Command(cmd) => {
                let start = Instant::now();
                self.handle_command(cmd);
                let us = start.elapsed().as_micros() as u64;
                incr(&self.stats.commands);
                self.stats.command_us.fetch_add(us, Ordering::Relaxed);
                self.stats.command_us_max.fetch_max(us, Ordering::Relaxed);
            }
            Msg::Attach { track, worker } => self.attach(track, worker),
            Msg::Detach { track, worker } => self.detach(track, worker),
            Msg::Media { track, packet } => {
                // Sent at the next flush, which counts from the earliest read it carries.
                let at = self
                    .read_at
                    .map_or(packet.read_at, |t| t.min(packet.read_at));
                self.read_at = Some(at);
                self.hold(track, packet);
            }
            Msg::Keyframe { track, rid } => self.keyframe_local(track, rid, Instant::now(), false),
            Msg::Unpublished { track } => self.source_gone(track),
            Msg::Shutdown => self.running = false,
        }
    }

    /// `worker` now has subscribers of our publication `track`.
    fn attach(&mut self, track: TrackKey, worker: WorkerIndex) {
        let found = self.publications.get(&track).copied();
        let Some((key, mid)) = found else {
            self.tell(worker, Msg::Unpublished { track });
            return;
        };
        if let Some(p) = self
            .sessions
            .get_mut(&key)
            .and_then(|s| s.publications.get_mut(&mid))
        {
            match p.fanout.iter_mut().find(|(w, _)| *w == worker) {
                Some((_, n)) => *n += 1,
                None => p.fanout.push((worker, 1)),
            }
        }
        self.keyframe_local(track, None, Instant::now(), false);
    }

    fn detach(&mut self, track: TrackKey, worker: WorkerIndex) {
        let Some((key, mid)) = self.publications.get(&track).copied() else {
            return;
        };
        if let Some(p) = self
            .sessions
            .get_mut(&key)
            .and_then(|s| s.publications.get_mut(&mid))
        {
            if let Some(i) = p.fanout.iter().position(|(w, _)| *w == worker) {
                p.fanout[i].1 -= 1;
                if p.fanout[i].1 == 0 {
                    p.fanout.swap_remove(i);
                }
            }
        }
    }

    /// Sends to a worker, or handles at once when it is this one.
    fn tell(&mut self, worker: WorkerIndex, msg: Msg) {
        if worker == self.index {
            self.handle_msg(msg);
        } else {
            self.peers[worker].post(msg);
        }
    }

    /// Our subscribers of `track` lose their source.
    fn source_gone(&mut self, track: TrackKey) {
        let subs = self.subscribers.remove(&track).map(|f| f.subs);
        for (_, _, sub) in subs.unwrap_or_default() {
            sub.borrow_mut().open = false;
        }
    }

    /// Closes publication `mid` of session `key`; returns its name if it was open.
    fn unpublish(&mut self, key: SessionKey, mid: Mid) -> Option<String> {
        let s = self.sessions.get_mut(&key)?;
        let p = s.publications.get_mut(&mid)?;
        if !p.open {
            return None;
        }
        p.open = false;
        let track = p.key;
        let fanout = std::mem::take(&mut p.fanout);
        let name = p.track_name.clone();
        self.publications.remove(&track);
        self.deferred_keyframes.remove(&track);
        for (w, _) in fanout {
            self.tell(w, Msg::Unpublished { track });
        }
        Some(name)
    }

    /// Ends subscription `mid` of session `key`.
    fn unsubscribe(&mut self, key: SessionKey, mid: Mid) -> bool {
        let Some(sub) = self
            .sessions
            .get(&key)
            .and_then(|s| s.subscriptions.get(&mid))
        else {
            return false;
        };
        let mut sub = sub.borrow_mut();
        if !sub.open {
            return false;
        }
        sub.open = false;
        let (track, source_worker) = (sub.source, sub.source_worker);
        drop(sub);
        self.unlink_subscriber(track, key, mid);
        self.tell(
            source_worker,
            Msg::Detach {
                track,
                worker: self.index,
            },
        );
        true
    }

    /// Adds subscription `(key, mid)`, `sub`, to `track`'s fan-out on this worker.
    fn link_subscriber(
        &mut self,
        track: TrackKey,
        key: SessionKey,
        mid: Mid,
        sub: SharedSubscription,
    ) {
        self.subscribers
            .entry(track)
            .or_default()
            .subs
            .push((key, mid, sub));
    }

    /// Takes subscription `(key, mid)` off `track`'s fan-out; the fan-out (and the payloads
    /// it kept) goes with its last subscriber.
    fn unlink_subscriber(&mut self, track: TrackKey, key: SessionKey, mid: Mid) {
        if let Some(fanout) = self.subscribers.get_mut(&track) {
            fanout.subs.retain(|(k, m, _)| (*k, *m) != (key, mid));
            if fanout.subs.is_empty() {
                self.subscribers.remove(&track);
            }
        }
    }

    /// Re-points a pulled m-line and/or changes its simulcast layer (`tracks/update`).
    fn update(&mut self, key: SessionKey, item: UpdateItem) -> Result<Updated, ItemError> {
        let mid = Mid::from(item.mid.as_str());
        let s = self.sessions.get(&key).ok_or(ItemError::Internal)?;
        let shared = s
            .subscriptions
            .get(&mid)
            .filter(|sub| sub.borrow().open)
            .map(Rc::clone)
            .ok_or_else(|| {
                ItemError::NotUpdatable(format!("mid {} is not an open pulled track", item.mid))
            })?;
        let mut sub = shared.borrow_mut();
        if let Some(new) = &item.source {
            if new.kind != sub.kind {
                return Err(ItemError::NotUpdatable(format!(
                    "mid {} carries {}, the new track is {}",
                    item.mid,
                    sub.kind.as_str(),
                    new.kind.as_str()
                )));
            }
        }
        if let Some(rid) = &item.preferred_rid {
            sub.prefer_layer(rid);
        }
        let (old, old_worker) = (sub.source, sub.source_worker);
        let switch = item.source.filter(|new| new.source != old);
        if let Some(new) = switch {
            let (track, worker) = (new.source, new.source_worker);
            sub.repoint(new);
            let done = Updated {
                source_session_id: sub.source_session_id.clone(),
                track_name: sub.track_name.clone(),
            };
            drop(sub);
            self.unlink_subscriber(old, key, mid);
            let me = self.index;
            self.tell(
                old_worker,
                Msg::Detach {
                    track: old,
                    worker: me,
                },
            );
            self.link_subscriber(track, key, mid, shared);
            // Attaching asks the publisher for a keyframe.
            self.tell(worker, Msg::Attach { track, worker: me });
            return Ok(done);
        }
        let (track, w) = (sub.source, sub.source_worker);
        let done = Updated {
            source_session_id: sub.source_session_id.clone(),
            track_name: sub.track_name.clone(),
        };
        drop(sub);
        if let Some(preferred) = item.preferred_rid.as_deref() {
            self.request_keyframe(track, Some(Rid::from(preferred)), w);
        }
        Ok(done)
    }

    fn subscribe(&mut self, key: SessionKey, mid: Mid, item: PullItem) {
        let (track, source_worker) = (item.source, item.source_worker);
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let sub = Rc::new(RefCell::new(Subscription::new(item)));
        s.subscriptions.insert(mid, Rc::clone(&sub));
        s.remember(TrackSlot::Pulled(mid));
        self.link_subscriber(track, key, mid, sub);
        self.tell(
            source_worker,
            Msg::Attach {
                track,
                worker: self.index,
            },
        );
    }

    fn close_session(&mut self, key: SessionKey, reason: CloseReason) {
        let Some(s) = self.sessions.get(&key) else {
            return;
        };
        let pubs: Vec<Mid> = s.publications.keys().copied().collect();
        let subs: Vec<Mid> = s.subscriptions.keys().copied().collect();
        for mid in pubs {
            self.unpublish(key, mid);
        }
        for mid in subs {
            self.unsubscribe(key, mid);
        }
        let Some(mut s) = self.sessions.remove(&key) else {
            return;
        };
        if reason == CloseReason::Crashed {
            incr(&self.stats.crashed_sessions);
        }
        self.by_ufrag.remove(s.peer.ice_ufrag());
        for addr in &s.addrs {
            if self.by_addr.get(addr) == Some(&key) {
                self.by_addr.remove(addr);
            }
        }
        let _ = catch_unwind(AssertUnwindSafe(|| s.peer.disconnect()));
        self.stats
            .sessions
            .store(self.sessions.len(), Ordering::Relaxed);
        let _ = self.events.send(MediaEvent::SessionClosed { key, reason });
    }

    /// Runs `f` on a session's peer, turning a panic into a closed session.
    fn with_session<T>(
        &mut self,
        key: SessionKey,
        f: impl FnOnce(&mut Session) -> Result<T, SfuError>,
    ) -> Result<T, SfuError> {
        let s = self.sessions.get_mut(&key).ok_or(SfuError::SessionGone)?;
        match catch_unwind(AssertUnwindSafe(|| f(s))) {
            Ok(r) => r,
            Err(_) => {
                self.closing.push((key, CloseReason::Crashed));
                Err(SfuError::Internal)
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::AddSession {
                key,
                session_id: _,
                peer,
                offer,
                reply,
            } => {
                self.by_ufrag.insert(peer.ice_ufrag().to_string(), key);
                self.sessions.insert(key, Session::new(*peer, now));
                self.stats
                    .sessions
                    .store(self.sessions.len(), Ordering::Relaxed);
                let r = match offer {
                    None => Ok(None),
                    Some(sdp) => self
                        .with_session(key, |s| s.peer.accept_offer(&sdp).map_err(sdp_error))
                        .map(Some),
                };
                if r.is_err() {
                    // A session that could not take its first offer is of no use.
                    self.closing.push((key, CloseReason::NeverConnected));
                }
                reply(r);
                self.drain(key);
            }
            Command::Push {
                key,
                offer,
                items,
                auto_discover,
                reply,
            } => {
                let r = self.push(key, &offer, items, auto_discover, now);
                reply(r);
                self.drain(key);
            }
            Command::Pull { key, items, reply } => {
                let r = self.pull(key, items, now);
                reply(r);
                self.drain(key);
            }
            Command::Publish { key, items, reply } => {
                let r = self.with_session(key, |s| {
                    if s.peer.has_pending_offer() {
                        return Err(SfuError::OfferPending);
                    }
                    let mut names: Vec<&str> = Vec::new();
                    for i in &items {
                        if s.published_mid(&i.track_name).is_some()
                            || names.contains(&i.track_name.as_str())
                        {
                            return Err(SfuError::InvalidParams(format!(
                                "trackName {:?} is already published in this session",
                                i.track_name
                            )));
                        }
                        names.push(&i.track_name);
                    }
                    let medias: Vec<NewMedia> = items
                        .iter()
                        .map(|i| NewMedia {
                            kind: i.kind,
                            flow: if i.bidirectional {
                                Flow::SendRecv
                            } else {
                                Flow::Recv
                            },
                            stream_id: "opencalls".into(),
                            track_id: i.track_name.clone(),
                        })
                        .collect();
                    let (offer, mids) = s.peer.create_offer(&medias).map_err(sdp_error)?;
                    s.pending_pulls.clear();
                    s.pending_publishes = mids
                        .iter()
                        .zip(&items)
                        .map(|(m, i)| (*m, i.track_name.clone()))
                        .collect();
                    s.last_negotiation = now;
                    Ok(PullOutcome {
                        offer: Some(offer),
                        mids: mids.iter().map(|m| Ok(m.to_string())).collect(),
                    })
                });
                reply(r);
            }
            Command::Update { key, items, reply } => {
                let r = if self.sessions.contains_key(&key) {
                    Ok(items
                        .into_iter()
                        .map(|i| i.and_then(|i| self.update(key, i)))
                        .collect())
                } else {
                    Err(SfuError::SessionGone)
                };
                reply(r);
                self.drain(key);
            }
            Command::Answer { key, sdp, reply } => {
                let r = self.with_session(key, |s| {
                    if !s.peer.has_pending_offer() {
                        return Err(SfuError::NoPendingOffer);
                    }
                    let accepted = s.peer.accept_answer(&sdp);
                    let pulls = std::mem::take(&mut s.pending_pulls);
                    let publishes = std::mem::take(&mut s.pending_publishes);
                    accepted.map_err(sdp_error)?;
                    s.last_negotiation = now;
                    Ok((pulls, publishes))
                });
                let r = r.map(|(pulls, publishes)| {
                    for (mid, item) in pulls {
                        self.subscribe(key, mid, item);
                    }
                    publishes
                        .into_iter()
                        .filter_map(|(mid, name)| self.publish_mid(key, mid, name, now).ok())
                        .collect()
                });
                reply(r);
                self.drain(key);
            }
            Command::Close {
                key,
                mids,
                offer,
                reply,
            } => {
                let r = self.close_tracks(key, mids, offer.as_deref());
                reply(r);
                self.drain(key);
            }
            #[cfg(feature = "fault-injection")]
            Command::InjectPanic { key } => {
                let _ = self.with_session(key, |_| -> Result<(), SfuError> {
                    panic!("injected fault");
                });
            }
            Command::Get { key, reply } => {
                let r = self
                    .sessions
                    .get(&key)
                    .map(|s| s.track_states())
                    .ok_or(SfuError::SessionGone);
                reply(r);
            }
        }
    }

    /// `tracks/new` with remote tracks: `#name` items reuse this session's sendrecv m-line
    /// at once; the rest get m-lines in one SFU offer, subscribed when it is answered.
    fn pull(
        &mut self,
        key: SessionKey,
        items: Vec<Result<PullItem, ItemError>>,
        now: Instant,
    ) -> Result<PullOutcome, SfuError> {
        enum Plan {
            New(PullItem),
            Onto(Mid, PullItem),
            Failed(ItemError),
        }
        let s = self.sessions.get(&key).ok_or(SfuError::SessionGone)?;
        if s.peer.has_pending_offer() {
            return Err(SfuError::OfferPending);
        }
        let plans: Vec<Plan> = items
            .into_iter()
            .map(|i| match i {
                Err(e) => Plan::Failed(e),
                Ok(item) => match item.onto.clone() {
                    None => Plan::New(item),
                    Some(name) => match s.published_mid(&name).filter(|m| {
                        s.peer.can_send(*m)
                            && !s.subscriptions.get(m).is_some_and(|x| x.borrow().open)
                    }) {
                        Some(mid) => Plan::Onto(mid, item),
                        None => Plan::Failed(ItemError::NotUpdatable(format!(
                            "#{name} is not a free bidirectional local track of this session"
                        ))),
                    },
                },
            })
            .collect();
        let outcome = self.with_session(key, |s| {
            // a=msid must be unique per m-line (browsers reject duplicates), and one
            // session may pull the same track twice: number the repeats.
            let mut seen: Vec<TrackKey> = s
                .subscriptions
                .values()
                .map(|x| x.borrow().source)
                .collect();
            let medias: Vec<NewMedia> = plans
                .iter()
                .filter_map(|p| match p {
                    Plan::New(i) => Some(i),
                    _ => None,
                })
                .map(|i| {
                    let repeats = seen.iter().filter(|k| **k == i.source).count();
                    seen.push(i.source);
                    NewMedia {
                        kind: i.kind,
                        flow: Flow::Send,
                        stream_id: i.source_session_id.clone(),
                        track_id: if repeats == 0 {
                            i.track_name.clone()
                        } else {
                            format!("{}-{}", i.track_name, repeats + 1)
                        },
                    }
                })
                .collect();
            let (offer, new_mids) = if medias.is_empty() {
                (None, Vec::new())
            } else {
                let (o, m) = s.peer.create_offer(&medias).map_err(sdp_error)?;
                s.last_negotiation = now;
                (Some(o), m)
            };
            s.pending_pulls.clear();
            s.pending_publishes.clear();
            let mut new_mids = new_mids.into_iter();
            let mut mids = Vec::with_capacity(plans.len());
            let mut immediate = Vec::new();
            for plan in plans {
                match plan {
                    Plan::New(item) => {
                        let mid = new_mids.next().ok_or(SfuError::Internal)?;
                        mids.push(Ok(mid.to_string()));
                        s.pending_pulls.push((mid, item));
                    }
                    Plan::Onto(mid, item) => {
                        mids.push(Ok(mid.to_string()));
                        immediate.push((mid, item));
                    }
                    Plan::Failed(e) => mids.push(Err(e)),
                }
            }
            Ok((PullOutcome { offer, mids }, immediate))
        })?;
        let (outcome, immediate) = outcome;
        for (mid, item) in immediate {
            self.subscribe(key, mid, item);
        }
        Ok(outcome)
    }

    /// Records a publication on receiving m-line `mid` (after a client offer, or after the
    /// answer to our offer for a push without one).
    fn publish_mid(
        &mut self,
        key: SessionKey,
        mid: Mid,
        track_name: String,
        now: Instant,
    ) -> Result<Published, ItemError> {
        let s = self.sessions.get_mut(&key).ok_or(ItemError::Internal)?;
        let Some((kind, true)) = s.peer.media(mid) else {
            return Err(ItemError::MidNotFound(mid.to_string()));
        };
        let existing = s.publications.get(&mid).filter(|p| p.open);
        match (existing, s.published_mid(&track_name)) {
            // The same track pushed again (a client retry): same publication.
            (Some(p), _) if p.track_name == track_name => return Ok(published(mid, p, kind)),
            (_, Some(_)) | (Some(_), None) => return Err(ItemError::RepeatedTrackName),
            (None, None) => {}
        }
        let p = Publication {
            key: TrackKey::next(),
            track_name,
            open: true,
            last_media: now,
            pacer: Default::default(),
            fanout: Vec::new(),
        };
        let out = published(mid, &p, kind);
        self.publications.insert(p.key, (key, mid));
        s.publications.insert(mid, p);
        s.remember(TrackSlot::Published(mid));
        Ok(out)
    }

    fn push(
        &mut self,
        key: SessionKey,
        offer: &str,
        items: Vec<PushItem>,
        auto_discover: bool,
        now: Instant,
    ) -> Result<PushOutcome, SfuError> {
        let answer = self.with_session(key, |s| {
            if s.peer.has_pending_offer() {
                return Err(SfuError::OfferPending);
            }
            let answer = s.peer.accept_offer(offer).map_err(sdp_error)?;
            s.last_negotiation = now;
            Ok(answer)
        })?;
        let s = self.sessions.get_mut(&key).ok_or(SfuError::SessionGone)?;
        let mut wanted: Vec<(Mid, String, bool)> = items
            .into_iter()
            .map(|i| (Mid::from(i.mid.as_str()), i.track_name, false))
            .collect();
        if auto_discover {
            for (mid, _) in s.peer.receiving_mids(&offer_mids(offer)) {
                let taken = s.publications.get(&mid).is_some_and(|p| p.open)
                    || wanted.iter().any(|(m, _, _)| *m == mid);
                if !taken {
                    wanted.push((mid, random_hex(16), true));
                }
            }
        }
        let mut tracks = Vec::with_capacity(wanted.len());
        for (mid, track_name, _) in wanted {
            let result = self.publish_mid(key, mid, track_name.clone(), now);
            tracks.push(result.map_err(|e| (track_name, e)));
        }
        Ok(PushOutcome { answer, tracks })
    }

    fn close_tracks(
        &mut self,
        key: SessionKey,
        mids: Vec<String>,
        offer: Option<&str>,
    ) -> Result<CloseOutcome, SfuError> {
        let answer = match offer {
            None => {
                if !self.sessions.contains_key(&key) {
                    return Err(SfuError::SessionGone);
                }
                None
            }
            Some(sdp) => Some(self.with_session(key, |s| {
                if s.peer.has_pending_offer() {
                    return Err(SfuError::OfferPending);
                }
                s.peer.accept_offer(sdp).map_err(sdp_error)
            })?),
        };
        let mut results = Vec::with_capacity(mids.len());
        let mut unpublished = Vec::new();
        for mid in mids {
            let mid = Mid::from(mid.as_str());
            if let Some(name) = self.unpublish(key, mid) {
                unpublished.push(name);
                results.push(Ok(()));
            } else if self.unsubscribe(key, mid) {
                results.push(Ok(()));
            } else {
                results.push(Err(ItemError::AlreadyClosed));
            }
        }
        Ok(CloseOutcome {
            answer,
            results,
            unpublished,
        })
    }
}

fn published(mid: Mid, p: &Publication, kind: Kind) -> Published {
    Published {
        mid: mid.to_string(),
        track_name: p.track_name.clone(),
        key: p.key,
        kind,
    }
}

fn sdp_error(e: PeerError) -> SfuError {
    match e {
        PeerError::Sdp(s) => SfuError::Sdp(s),
        PeerError::NoPendingOffer => SfuError::NoPendingOffer,
        PeerError::Internal(s) => SfuError::Sdp(s),
    }
}

/// The `a=mid:` values of an SDP, in order.
fn offer_mids(sdp: &str) -> Vec<Mid> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=mid:"))
        .map(Mid::from)
        .collect()
}

/// `n` random lowercase hex characters.
pub fn random_hex(n: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(n);
    while s.len() < n {
        let _ = write!(s, "{:02x}", rand::random::<u8>());
    }
    s.truncate(n);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_work_runs_at_once_and_future_deadlines_wait_for_the_slack() {
        let now = Instant::now();
        assert_eq!(poll_wait(now, now), Duration::ZERO);
        assert_eq!(
            poll_wait(now, now - Duration::from_millis(3)),
            Duration::ZERO
        );
        let later = now + Duration::from_millis(20);
        assert_eq!(
            poll_wait(now, later),
            Duration::from_millis(20) + TIMER_SLACK
        );
    }
}
