//! A Calls session: one [`Peer`] plus the tracks it publishes and pulls.
//!
//! Pure bookkeeping; the owning [`crate::worker`] does I/O and routing between sessions.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::batch::Written;
use crate::command::{PullItem, TrackKey, TrackState, WorkerIndex};
use crate::forward::{History, KeyframePacer, SeqRewriter};
use crate::peer::{CodecSpec, EgressStream, Kind, Mid, Peer, Rid};
use crate::timers::{HasTimer, SessionTimer};

/// A track this session publishes (Calls `location: local`).
#[derive(Debug)]
pub(crate) struct Publication {
    pub key: TrackKey,
    pub track_name: String,
    pub open: bool,
    /// Last RTP packet, or publication time before the first one.
    pub last_media: Instant,
    pub pacer: KeyframePacer,
    /// Workers with at least one subscriber, with their subscriber counts.
    pub fanout: Vec<(WorkerIndex, u32)>,
}

/// A track this session pulls (Calls `location: remote`).
#[derive(Debug)]
pub(crate) struct Subscription {
    pub source: TrackKey,
    pub source_worker: WorkerIndex,
    pub source_session_id: String,
    pub track_name: String,
    pub open: bool,
    pub rewriter: SeqRewriter,
    /// Simulcast layer this subscriber gets (chosen at its first simulcast packet).
    pub layer: Option<Rid>,
    preferred: Option<Rid>,
    pub kind: Kind,
    /// Publisher codec → our payload type, cached.
    pub pt: Option<(CodecSpec, u8)>,
    /// Whether (and how) packets may leave without str0m, decided per payload type once
    /// the session is connected (see `Peer::egress_stream`).
    pub egress: Option<(u8, Option<EgressStream>)>,
    /// Packets sent without str0m since the last one written through it.
    pub egress_run: u32,
    /// What went out, for NACKs, where they are ours to answer (`EgressStream::resends`).
    pub history: History,
}

impl Subscription {
    pub fn new(item: PullItem) -> Subscription {
        let preferred = item.preferred_rid.clone();
        let step = match item.kind {
            Kind::Audio => 960,
            Kind::Video => 3000,
        };
        let first_seq: u16 = rand::random_range(1000..30000);
        Subscription {
            source: item.source,
            source_worker: item.source_worker,
            source_session_id: item.source_session_id,
            track_name: item.track_name.clone(),
            open: true,
            rewriter: SeqRewriter::new(first_seq, rand::random(), step),
            layer: None,
            preferred: preferred.as_deref().map(Rid::from),
            kind: item.kind,
            pt: None,
            egress: None,
            egress_run: 0,
            history: History::default(),
        }
    }
}

impl Subscription {
    /// Feeds this m-line from another publication from the next packet on.
    pub fn repoint(&mut self, item: PullItem) {
        self.source = item.source;
        self.source_worker = item.source_worker;
        self.source_session_id = item.source_session_id;
        self.track_name = item.track_name;
        self.layer = None;
        self.pt = None;
        self.egress = None;
        self.rewriter.switch_source();
        // Its entries name payloads kept for the old track.
        self.history = History::default();
    }

    /// Prefers another simulcast layer from the next packet of that layer on.
    pub fn prefer_layer(&mut self, rid: &str) {
        let rid = Rid::from(rid);
        self.preferred = Some(rid);
        if self.layer.is_some_and(|l| l != rid) {
            self.layer = None;
            self.rewriter.switch_source();
        }
    }

    /// Reads what the fan-out reads and writes for each packet (one field from each part)
    /// and folds it into a value that means nothing (see `Worker::read_ahead`).
    pub fn touch(&self) -> u64 {
        let mut folded = u64::from(self.egress_run) ^ u64::from(self.layer.is_some());
        folded ^= u64::from(self.pt.map_or(0, |(_, pt)| pt));
        folded ^= u64::from(self.egress.as_ref().map_or(0, |(pt, _)| *pt));
        folded ^ self.rewriter.touch() ^ self.history.touch()
    }

    /// Whether a packet of simulcast layer `rid` is for this subscriber. The first layer
    /// seen (or the preferred one) is kept; other layers are dropped.
    pub fn wants_layer(&mut self, rid: Option<Rid>) -> bool {
        match rid {
            None => true,
            Some(rid) => *self.layer.get_or_insert(self.preferred.unwrap_or(rid)) == rid,
        }
    }
}

/// A subscription, owned by its session and by the fan-out of the track it pulls. Only the
/// worker's thread ever touches it.
pub(crate) type SharedSubscription = Rc<RefCell<Subscription>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrackSlot {
    Published(Mid),
    Pulled(Mid),
}

/// One Calls session.
pub(crate) struct Session {
    pub peer: Peer,
    pub publications: FxHashMap<Mid, Publication>,
    /// Shared with the fan-out of the track each one pulls (`Worker::deliver`), which
    /// reaches a subscriber's state through its own handle, without this map.
    pub subscriptions: FxHashMap<Mid, SharedSubscription>,
    /// Every track in creation order (closed ones too: GET lists them as inactive).
    pub order: Vec<TrackSlot>,
    /// Pulls waiting for the answer to our offer.
    pub pending_pulls: Vec<(Mid, PullItem)>,
    /// Tracks published by our offer, waiting for its answer: (mid, track name).
    pub pending_publishes: Vec<(Mid, String)>,
    /// Creation or last negotiation, for the never-connected timeout.
    pub last_negotiation: Instant,
    pub disconnected_since: Option<Instant>,
    /// Client addresses ICE validated for this session.
    pub addrs: Vec<SocketAddr>,
    /// Its place in the worker's timers.
    pub timer: SessionTimer,
    /// Where str0m last sent media-plane datagrams (DTLS, SRTP, SRTCP): our socket and the
    /// client's nominated address. Packets that leave without str0m go there too.
    pub send_path: Option<(usize, SocketAddr)>,
    /// Packets sealed beside str0m in this input batch, sent together (back to back, so
    /// equal-sized ones leave as one GSO send) when the batch is done.
    pub egress_out: EgressQueue,
}

/// A session's packets sealed beside str0m (into the worker's outbox buffer), each with
/// the m-line it is for, waiting for the worker's flush to queue them.
#[derive(Debug, Default)]
pub struct EgressQueue {
    out: Vec<(Written, Mid)>,
}

impl EgressQueue {
    /// Queues a packet for m-line `mid`; true when it is the first of this batch (the
    /// session then needs a place on the worker's list of sessions to release).
    pub fn push(&mut self, datagram: Written, mid: Mid) -> bool {
        self.out.push((datagram, mid));
        self.out.len() == 1
    }

    /// Takes the packets in the order they leave (see [`gso_order`]; `lines` is its
    /// scratch, the worker's).
    pub fn drain<'a>(&'a mut self, lines: &mut Vec<LineRun>) -> impl Iterator<Item = Written> + 'a {
        gso_order(&mut self.out, lines, Written::size);
        self.out.drain(..).map(|(datagram, _)| datagram)
    }

    /// Reads the queue's header, for `Session::touch`.
    pub fn touch(&self) -> u64 {
        self.out.capacity() as u64
    }

    pub fn clear(&mut self) {
        self.out.clear();
    }
}

/// One m-line's packets in a session's batch, for [`gso_order`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineRun {
    mid: Mid,
    /// Where its first packet is in the batch.
    first: usize,
    first_size: usize,
    last_size: usize,
}

impl LineRun {
    /// Larger first packets first; among equal ones, m-lines that end shorter last (their
    /// short packet ends a GSO run); then the batch's order.
    fn key(&self) -> (std::cmp::Reverse<usize>, bool, usize) {
        (
            std::cmp::Reverse(self.first_size),
            self.last_size < self.first_size,
            self.first,
        )
    }
}

/// Orders one session's packets of an input batch so that UDP GSO sends carry as many as
/// they can. The outbox makes one send of back-to-back datagrams of one size (a shorter one
/// ending it), and the fan-out queues a subscriber's packets track by track, so a run of
/// video packets would end at every audio packet between two video tracks. Each m-line's
/// packets keep their order (they are one RTP stream and its retransmissions); whole
/// m-lines move: those whose first packet is larger go first, and among equal ones an
/// m-line whose last packet is shorter (a frame's end) goes after those that run on.
pub(crate) fn gso_order<T>(
    items: &mut [(T, Mid)],
    lines: &mut Vec<LineRun>,
    size: impl Fn(&T) -> usize,
) {
    if items.len() < 2 {
        return;
    }
    lines.clear();
    for (i, (item, mid)) in items.iter().enumerate() {
        let n = size(item);
        match lines.iter_mut().find(|l| l.mid == *mid) {
            Some(l) => l.last_size = n,
            None => lines.push(LineRun {
                mid: *mid,
                first: i,
                first_size: n,
                last_size: n,
            }),
        }
    }
    if lines.len() < 2 {
        return;
    }
    // Stable: packets of one m-line share a key and keep their order.
    items.sort_by_key(|(_, mid)| {
        lines
            .iter()
            .find(|l| l.mid == *mid)
            .map_or((std::cmp::Reverse(0), true, usize::MAX), LineRun::key)
    });
}

impl Session {
    pub fn new(peer: Peer, now: Instant) -> Session {
        Session {
            peer,
            publications: FxHashMap::default(),
            subscriptions: FxHashMap::default(),
            order: Vec::new(),
            pending_pulls: Vec::new(),
            pending_publishes: Vec::new(),
            last_negotiation: now,
            disconnected_since: None,
            addrs: Vec::new(),
            timer: SessionTimer::default(),
            send_path: None,
            egress_out: EgressQueue::default(),
        }
    }

    /// Reads the session's parts the fan-out uses for each packet, as
    /// [`Subscription::touch`] does.
    pub fn touch(&self) -> u64 {
        u64::from(self.peer.was_connected())
            ^ self.send_path.map_or(0, |(i, _)| i as u64)
            ^ self.egress_out.touch()
            ^ self.timer.touch()
    }

    /// The open publication with this name, if any.
    pub fn published_mid(&self, track_name: &str) -> Option<Mid> {
        self.publications
            .iter()
            .find(|(_, p)| p.open && p.track_name == track_name)
            .map(|(mid, _)| *mid)
    }

    /// GET view.
    pub fn track_states(&self) -> Vec<TrackState> {
        self.order
            .iter()
            .filter_map(|slot| match slot {
                TrackSlot::Published(mid) => self.publications.get(mid).map(|p| TrackState {
                    local: true,
                    mid: mid.to_string(),
                    track_name: p.track_name.clone(),
                    source_session_id: None,
                    active: p.open,
                }),
                TrackSlot::Pulled(mid) => self.subscriptions.get(mid).map(|s| {
                    let s = s.borrow();
                    TrackState {
                        local: false,
                        mid: mid.to_string(),
                        track_name: s.track_name.clone(),
                        source_session_id: Some(s.source_session_id.clone()),
                        active: s.open,
                    }
                }),
            })
            .collect()
    }

    /// Records a slot once (a re-published mid keeps its place).
    pub fn remember(&mut self, slot: TrackSlot) {
        if !self.order.contains(&slot) {
            self.order.push(slot);
        }
    }
}

impl HasTimer for Session {
    fn timer(&mut self) -> &mut SessionTimer {
        &mut self.timer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `gso_order` over packets given as (name, size, m-line) and names the result.
    fn gso_ordered(packets: &[(&'static str, usize, &str)]) -> Vec<&'static str> {
        let mut items: Vec<((&'static str, usize), Mid)> = packets
            .iter()
            .map(|&(name, size, mid)| ((name, size), Mid::from(mid)))
            .collect();
        gso_order(&mut items, &mut Vec::new(), |p| p.1);
        items.iter().map(|((name, _), _)| *name).collect()
    }

    #[test]
    fn video_of_several_tracks_goes_back_to_back_before_audio() {
        let order = gso_ordered(&[
            ("a1", 1100, "0"),
            ("a2", 1100, "0"),
            ("b1", 150, "1"),
            ("c1", 1100, "2"),
        ]);
        assert_eq!(order, ["a1", "a2", "c1", "b1"]);
    }

    #[test]
    fn a_track_ending_in_a_shorter_packet_ends_the_run() {
        let order = gso_ordered(&[
            ("a1", 1100, "0"),
            ("a2", 1100, "0"),
            ("a3", 700, "0"),
            ("c1", 1100, "2"),
            ("c2", 1100, "2"),
        ]);
        assert_eq!(order, ["c1", "c2", "a1", "a2", "a3"]);
    }

    #[test]
    fn each_m_line_keeps_its_own_order_whatever_the_sizes() {
        // A frame's short last packet, then the next frame's first: they stay in order,
        // and the m-line moves whole behind the one whose first packet is larger.
        let order = gso_ordered(&[
            ("a1", 700, "0"),
            ("a2", 1100, "0"),
            ("b1", 90, "1"),
            ("c1", 1100, "2"),
            ("b2", 200, "1"),
        ]);
        assert_eq!(order, ["c1", "a1", "a2", "b1", "b2"]);
        // One m-line alone is never reordered.
        let order = gso_ordered(&[("x1", 120, "1"), ("x2", 200, "1"), ("x3", 90, "1")]);
        assert_eq!(order, ["x1", "x2", "x3"]);
    }

    fn item(preferred: Option<&str>) -> PullItem {
        PullItem {
            source: TrackKey(1),
            source_worker: 0,
            kind: Kind::Video,
            source_session_id: "s".into(),
            track_name: "t".into(),
            preferred_rid: preferred.map(String::from),
            onto: None,
        }
    }

    #[test]
    fn one_simulcast_layer_per_subscriber() {
        let mut s = Subscription::new(item(None));
        assert!(s.wants_layer(None), "non-simulcast packets always pass");
        assert!(
            s.wants_layer(Some(Rid::from("q"))),
            "first layer seen is kept"
        );
        assert!(!s.wants_layer(Some(Rid::from("h"))));
        assert!(s.wants_layer(Some(Rid::from("q"))));

        let mut p = Subscription::new(item(Some("h")));
        assert!(!p.wants_layer(Some(Rid::from("q"))), "preferred layer wins");
        assert!(p.wants_layer(Some(Rid::from("h"))));

        // tracks/update switches the layer.
        p.prefer_layer("q");
        assert!(!p.wants_layer(Some(Rid::from("h"))));
        assert!(p.wants_layer(Some(Rid::from("q"))));
    }
}
