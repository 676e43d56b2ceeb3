//! join-storm: subscribers join and leave at a set rate while a webinar runs underneath.
//!
//! A joiner thread (on the generator's core, like everything of the generator) does what a
//! Calls app does for each newcomer — `sessions/new`, `tracks/new` pulling the publisher's
//! audio and video, the client's answer via `renegotiate` — or the Janus/raw equivalent,
//! and hands the ready peer to the media loop. The media loop measures join time
//! (request → first RTP), keeps each joiner for [`STAY`], then makes it leave (tracks
//! closed with `force`, the PeerConnection dropped) and hands the leave back to the joiner
//! thread for its API call. Background subscribers' loss and latency show whether churn
//! disturbs media already flowing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Interest, Poll, Token};
use opencalls_testkit::Api;
use serde_json::json;

use crate::peer::BenchPeer;
use crate::raw_client::RawPeer;
use crate::world::Driver;

/// How long a joiner stays after its first RTP packet.
pub const STAY: Duration = Duration::from_secs(1);
/// A joiner with no RTP this long after its request counts as a failed join.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Meter indexes of joiners start here (background peers use their slot index).
const JOINER_INDEX: usize = 1_000_000;

/// How newcomers join one target.
pub enum Joining {
    Opencalls {
        api: Api,
        session: String,
        tracks: Vec<String>,
        ip: std::net::IpAddr,
    },
    Janus {
        client: Arc<crate::janus::JanusClient>,
        room: u64,
        feed: u64,
        ip: std::net::IpAddr,
    },
    Raw {
        relay: SocketAddr,
        groups: Vec<u32>,
    },
}

/// What a leave needs from the joiner thread.
pub enum Leave {
    Opencalls { session: String, mids: Vec<String> },
    Janus(u64),
    Raw,
}

struct Joined {
    driver: Driver,
    started: Instant,
    leave: Leave,
}

impl Joining {
    fn join(&self, index: usize) -> anyhow::Result<Joined> {
        match self {
            Joining::Opencalls {
                api,
                session: publisher,
                tracks,
                ip,
            } => {
                let mut p = BenchPeer::new(index, true, *ip)?;
                let started = p.join_started;
                let items = tracks
                    .iter()
                    .map(|t| json!({"location": "remote", "sessionId": publisher, "trackName": t}))
                    .collect();
                let (session, mids) = crate::world::pull_session(api, &mut p, items)?;
                Ok(Joined {
                    driver: Driver::Str0m(p),
                    started,
                    leave: Leave::Opencalls { session, mids },
                })
            }
            Joining::Janus {
                client,
                room,
                feed,
                ip,
            } => {
                let mut p = BenchPeer::new(index, true, *ip)?;
                let started = p.join_started;
                let (handle, offer) = client.subscribe(*room, *feed)?;
                let answer = p.accept_offer(&offer)?;
                client.start_subscriber(handle, &answer)?;
                Ok(Joined {
                    driver: Driver::Str0m(p),
                    started,
                    leave: Leave::Janus(handle),
                })
            }
            Joining::Raw { relay, groups } => {
                let mut p = RawPeer::new(index, *relay)?;
                let started = Instant::now();
                for g in groups {
                    p.subscribe(*g)?;
                }
                Ok(Joined {
                    driver: Driver::Raw(p),
                    started,
                    leave: Leave::Raw,
                })
            }
        }
    }

    fn leave(&self, leave: Leave) -> anyhow::Result<()> {
        match (self, leave) {
            (Joining::Opencalls { api, .. }, Leave::Opencalls { session, mids }) => {
                let tracks: Vec<_> = mids.iter().map(|m| json!({ "mid": m })).collect();
                let r = api.send(
                    "PUT",
                    &format!("sessions/{session}/tracks/close"),
                    Some(&json!({"tracks": tracks, "force": true})),
                );
                anyhow::ensure!(r.status == 200, "tracks/close failed: {}", r.body);
                Ok(())
            }
            (Joining::Janus { client, .. }, Leave::Janus(handle)) => client.detach(handle),
            _ => Ok(()),
        }
    }
}

/// One joiner that reached the media loop.
struct Live {
    slot: usize,
    started: Instant,
    leave: Option<Leave>,
}

/// One finished join: when it was asked for and when its first RTP arrived (None: failed).
#[derive(Debug, Clone, Copy)]
pub struct JoinRecord {
    pub started: Instant,
    pub first_rtp: Option<Instant>,
}

/// The media loop's side of a storm.
pub struct Storm {
    joined: Receiver<anyhow::Result<Joined>>,
    leaves: Sender<Leave>,
    live: VecDeque<Live>,
    next_check: Instant,
    pub records: Vec<JoinRecord>,
    /// Join requests that failed before reaching the media loop (API or SDP errors).
    pub request_failures: usize,
    /// A raw join not yet turned into a keyframe request (an SFU asks its publisher for a
    /// keyframe when a subscriber joins; the relay cannot, so the generator does).
    raw_joined: bool,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Storm {
    /// Starts the joiner thread: `rate` joins per second until stopped.
    pub fn start(joining: Joining, rate: f64) -> anyhow::Result<Storm> {
        let (joined_tx, joined) = std::sync::mpsc::channel();
        let (leaves, leaves_rx) = std::sync::mpsc::channel::<Leave>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
        let thread = std::thread::Builder::new()
            .name("joiner".into())
            .spawn(move || {
                let mut next = Instant::now();
                let mut k = 0;
                while !stop2.load(Ordering::Relaxed) {
                    while let Ok(l) = leaves_rx.try_recv() {
                        if let Err(e) = joining.leave(l) {
                            eprintln!("  leave failed: {e:#}");
                        }
                    }
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(5)));
                        continue;
                    }
                    // Behind schedule by more than a second: skip ahead, not a burst.
                    next =
                        (next + period).max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
                    let r = joining.join(JOINER_INDEX + k);
                    k += 1;
                    if joined_tx.send(r).is_err() {
                        return;
                    }
                }
                // Leaves still owed after the stop.
                while let Ok(l) = leaves_rx.recv_timeout(Duration::from_millis(200)) {
                    let _ = joining.leave(l);
                }
            })?;
        Ok(Storm {
            joined,
            leaves,
            live: VecDeque::new(),
            next_check: Instant::now(),
            records: Vec::new(),
            request_failures: 0,
            raw_joined: false,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops new joins (joiners already in the loop still finish).
    pub fn stop_joining(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Joiners still in the media loop.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Whether raw subscribers joined since the last call (they want a keyframe).
    pub fn take_raw_joins(&mut self) -> bool {
        std::mem::take(&mut self.raw_joined)
    }

    /// Takes in new joiners (every call, so join times are not rounded up to a tick) and
    /// makes due ones leave (every 10 ms).
    pub fn service(&mut self, now: Instant, peers: &mut Vec<Driver>, poll: &Poll) {
        while let Ok(j) = self.joined.try_recv() {
            let mut j = match j {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("  join failed: {e:#}");
                    self.request_failures += 1;
                    continue;
                }
            };
            let slot = peers.len();
            let Some(socket) = j.driver.socket() else {
                continue;
            };
            if poll
                .registry()
                .register(socket, Token(slot), Interest::READABLE)
                .is_err()
            {
                self.request_failures += 1;
                continue;
            }
            self.raw_joined |= matches!(j.driver, Driver::Raw(_));
            peers.push(j.driver);
            self.live.push_back(Live {
                slot,
                started: j.started,
                leave: Some(j.leave),
            });
        }
        if now < self.next_check {
            return;
        }
        self.next_check = now + Duration::from_millis(10);
        let leaves = &self.leaves;
        let records = &mut self.records;
        self.live.retain_mut(|l| {
            let first = peers[l.slot].first_rtp();
            let due = match first {
                Some(f) => now >= f + STAY,
                None => now >= l.started + JOIN_TIMEOUT,
            };
            if !due {
                return true;
            }
            records.push(JoinRecord {
                started: l.started,
                first_rtp: first,
            });
            let mut gone = std::mem::replace(&mut peers[l.slot], Driver::Gone);
            if let Driver::Raw(p) = &mut gone {
                p.unsubscribe_all();
            }
            if let Some(socket) = gone.socket() {
                let _ = poll.registry().deregister(socket);
            }
            if let Some(leave) = l.leave.take() {
                let _ = leaves.send(leave);
            }
            false
        });
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Let the thread finish owed leaves; it exits when the channel closes or times out.
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.leaves, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
