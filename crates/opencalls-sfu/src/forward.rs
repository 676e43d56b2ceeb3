//! Per-subscription rewriting and send history, per-publication keyframe pacing.
//!
//! A subscriber must see one continuous RTP stream per m-line whatever happens upstream
//! (publisher restarts, track re-pointed, SSRC change), so every subscription rewrites
//! sequence numbers and timestamps. Where the worker answers a subscriber's NACKs itself
//! (video on the egress path), the subscription keeps what it sent in a [`History`].
//! Keyframe requests from many subscribers are folded into at most one per publication
//! per [`KEYFRAME_INTERVAL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Smallest spacing between two keyframe requests sent to one publisher.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);

/// A jump larger than this in the source's sequence numbers is a new source, not loss.
const MAX_SEQ_GAP: u64 = 3000;

/// Continuous sequence numbers and timestamps for one subscriber.
#[derive(Debug, Clone)]
pub struct SeqRewriter {
    /// out = in + seq_offset (mod 2^64)
    seq_offset: u64,
    ts_offset: u32,
    last_in_seq: Option<u64>,
    last_out_seq: u64,
    last_out_ts: u32,
    /// First sequence number of the current source in output numbering.
    start_out_seq: u64,
    /// Timestamp step assumed across a source switch (one 30 fps frame or 20 ms of audio).
    switch_ts_step: u32,
    /// The next packet starts a new source.
    pending_switch: bool,
}

impl SeqRewriter {
    /// `first_seq` is the first sequence number this subscriber will see (keep it below
    /// 2^15 so no SRTP roll-over counter ever needs signalling).
    pub fn new(first_seq: u16, first_ts: u32, clock_step: u32) -> SeqRewriter {
        SeqRewriter {
            seq_offset: 0,
            ts_offset: first_ts,
            last_in_seq: None,
            last_out_seq: u64::from(first_seq).wrapping_sub(1),
            last_out_ts: first_ts,
            start_out_seq: u64::from(first_seq),
            switch_ts_step: clock_step,
            pending_switch: false,
        }
    }

    /// Rewrites one packet; `None` for a duplicate or a packet too old to place.
    pub fn rewrite(&mut self, in_seq: u64, in_ts: u32) -> Option<(u64, u32)> {
        if std::mem::take(&mut self.pending_switch) {
            self.rebase(in_seq, in_ts);
            return self.emit(in_seq, in_ts);
        }
        match self.last_in_seq {
            None => self.rebase(in_seq, in_ts),
            Some(last) => {
                if in_seq > last + MAX_SEQ_GAP || in_seq + MAX_SEQ_GAP < last {
                    self.rebase(in_seq, in_ts);
                } else if in_seq <= last {
                    // Reordered packet: forward it in place if it still falls after the
                    // start of the current source, else drop.
                    let out = in_seq.wrapping_add(self.seq_offset);
                    if in_seq == last || out < self.start_out_seq {
                        return None;
                    }
                    return Some((out, in_ts.wrapping_add(self.ts_offset)));
                }
            }
        }
        self.emit(in_seq, in_ts)
    }

    fn emit(&mut self, in_seq: u64, in_ts: u32) -> Option<(u64, u32)> {
        self.last_in_seq = Some(in_seq);
        let out_seq = in_seq.wrapping_add(self.seq_offset);
        let out_ts = in_ts.wrapping_add(self.ts_offset);
        self.last_out_seq = out_seq;
        self.last_out_ts = out_ts;
        Some((out_seq, out_ts))
    }

    /// Reads the state `rewrite` uses, for `Subscription::touch`.
    pub fn touch(&self) -> u64 {
        self.last_out_seq ^ u64::from(self.ts_offset)
    }

    /// The next packet comes from another RTP stream (another publication or simulcast
    /// layer): continue the numbering after what was sent, whatever its sequence numbers.
    pub fn switch_source(&mut self) {
        if self.last_in_seq.is_some() {
            self.pending_switch = true;
        }
    }

    fn rebase(&mut self, in_seq: u64, in_ts: u32) {
        let next_seq = self.last_out_seq.wrapping_add(1);
        self.seq_offset = next_seq.wrapping_sub(in_seq);
        let next_ts = if self.last_in_seq.is_none() {
            self.ts_offset
        } else {
            self.last_out_ts.wrapping_add(self.switch_ts_step)
        };
        self.ts_offset = next_ts.wrapping_sub(in_ts);
        self.start_out_seq = next_seq;
        self.last_in_seq = Some(in_seq);
    }
}

/// Folds keyframe requests for one publication.
#[derive(Debug, Default, Clone)]
pub struct KeyframePacer {
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframePacer {
    /// Registers a request; true when one should go to the publisher now.
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last_sent {
            Some(t) if now.saturating_duration_since(t) < KEYFRAME_INTERVAL => {
                self.pending = true;
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// A deferred request whose time has come; true when one should go out now.
    pub fn poll_deferred(&mut self, now: Instant) -> bool {
        self.pending && self.request(now)
    }

    /// Whether a request is waiting for its slot.
    pub fn has_deferred(&self) -> bool {
        self.pending
    }
}

/// Outgoing sequence numbers a subscription can still be asked for: about 2.7 s of
/// 1.5 Mbit/s video (190 packets a second), more than any NACK asks for (a NACK older than a
/// round trip or two is useless).
const HISTORY_LEN: u64 = 512;

/// Runs a [`History`] keeps besides the current one: a new run starts where the mapping
/// from outgoing numbers to the track's [`Recent`] breaks (upstream loss, a reordered
/// packet, a source switch, another simulcast layer's packets in between), so this many
/// cover the window even when every packet is its own run.
const MAX_RUNS: usize = HISTORY_LEN as usize;

/// How often one packet may be sent again: a receiver re-asks when a retransmission is
/// lost too; past this its requests are not loss but abuse (each answer costs us a packet).
const MAX_RESENDS: u8 = 3;

/// Packets recently resent, with their counts, per subscription (for [`MAX_RESENDS`]).
const RESENT_KEPT: usize = 32;

/// Resends a subscription may have in hand: one is earned per packet sent, so answering
/// NACKs never sends more than the stream itself over time, whatever a receiver asks.
const MAX_CREDIT: u32 = 256;

/// A retransmission a [`History`] allows: where its payload is in the track's [`Recent`],
/// and what to rewrite its header with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Its payload's index in the track's [`Recent`].
    pub packet: u64,
    /// Outgoing minus incoming RTP time.
    pub ts_offset: u32,
    pub pt: u8,
}

/// Packets sent with consecutive outgoing numbers whose payloads were consecutive in the
/// track's [`Recent`], under one RTP time offset and payload type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// The first packet's extended outgoing sequence number.
    seq: u64,
    /// The first packet's index in the track's [`Recent`].
    packet: u64,
    len: u32,
    ts_offset: u32,
    pt: u8,
}

impl Run {
    fn end(&self) -> u64 {
        self.seq + u64::from(self.len)
    }

    fn continued_by(&self, seq: u64, packet: u64, ts_offset: u32, pt: u8) -> bool {
        seq == self.end()
            && packet == self.packet + u64::from(self.len)
            && ts_offset == self.ts_offset
            && pt == self.pt
    }
}

/// What was sent to one subscriber in the last [`HISTORY_LEN`] outgoing numbers, as runs
/// (see [`Run`]): a packet that continues the current run only counts it, in the
/// subscription's own memory, where a table of every packet sent would cost each subscriber
/// a store into a ring far from the rest of its state per packet (a cache miss at fan-out
/// sizes). Entries name payloads in the [`Recent`] of the track it was pulling then.
#[derive(Debug, Default)]
pub(crate) struct History {
    current: Option<Run>,
    /// Closed runs, oldest first.
    older: std::collections::VecDeque<Run>,
    /// The newest outgoing number sent.
    latest: u64,
    /// Resends in hand (see [`MAX_CREDIT`]).
    credit: u32,
    /// Recently resent numbers and their counts, oldest first.
    resent: Vec<(u64, u8)>,
}

impl History {
    /// Remembers a packet just sent: outgoing number `seq`, payload `packet` in the track's
    /// [`Recent`], outgoing RTP time minus incoming `ts_offset`, payload type `pt`.
    pub fn push(&mut self, seq: u64, ts_offset: u32, pt: u8, packet: u64) {
        self.latest = self.latest.max(seq);
        self.credit = (self.credit + 1).min(MAX_CREDIT);
        if let Some(run) = &mut self.current {
            if run.continued_by(seq, packet, ts_offset, pt) {
                run.len += 1;
                return;
            }
            self.older.push_back(*run);
            let window = self.latest.saturating_sub(HISTORY_LEN);
            while self
                .older
                .front()
                .is_some_and(|r| r.end() <= window || self.older.len() > MAX_RUNS)
            {
                self.older.pop_front();
            }
        }
        self.current = Some(Run {
            seq,
            packet,
            len: 1,
            ts_offset,
            pt,
        });
    }

    /// Reads what a push reads and writes, for `Subscription::touch`.
    pub fn touch(&self) -> u64 {
        // Every field a push reads or writes (they may lie on two cache lines).
        self.current.map_or(0, |r| u64::from(r.len)) ^ self.latest ^ u64::from(self.credit)
    }

    /// The packet a NACK names by its 16-bit sequence number, with its extended number, if
    /// still held and not sent again too often already; counts the resend.
    pub fn resend(&mut self, seq: u16) -> Option<(u64, Sent)> {
        self.current?;
        // The extended number closest below or at the newest one sent.
        let mut ext = (self.latest & !0xffff) | u64::from(seq);
        if ext > self.latest {
            ext = ext.checked_sub(1 << 16)?;
        }
        if self.latest - ext >= HISTORY_LEN || self.credit == 0 {
            return None;
        }
        let run = self
            .current
            .iter()
            .chain(self.older.iter().rev())
            .find(|r| r.seq <= ext && ext < r.end())?;
        let sent = Sent {
            packet: run.packet + (ext - run.seq),
            ts_offset: run.ts_offset,
            pt: run.pt,
        };
        match self.resent.iter_mut().find(|(s, _)| *s == ext) {
            Some((_, n)) if *n >= MAX_RESENDS => return None,
            Some((_, n)) => *n += 1,
            None => {
                if self.resent.len() == RESENT_KEPT {
                    self.resent.remove(0);
                }
                self.resent.push((ext, 1));
            }
        }
        self.credit -= 1;
        Some((ext, sent))
    }
}

/// Payloads kept per track and worker for its subscribers' retransmissions: the last
/// [`RECENT_LEN`] of the track (~2.7 s of 1.5 Mbit/s video; spread over its simulcast
/// layers, still more than a NACK round trip). Every payload held costs its size for that
/// long: 2048 held 2.3 MB per video track.
const RECENT_LEN: usize = HISTORY_LEN as usize;

/// A payload [`Recent`] holds, with the incoming header fields a retransmission needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kept<'a> {
    pub payload: &'a Arc<[u8]>,
    /// Incoming RTP time.
    pub rtp_time: u32,
    pub marker: bool,
}

#[derive(Debug, Clone, Default)]
struct RecentSlot {
    index: u64,
    payload: Option<Arc<[u8]>>,
    rtp_time: u32,
    marker: bool,
}

/// The payloads one track's subscribers on a worker were recently sent, held once for all
/// of them (each subscriber's [`History`] names them by index): one reference per packet,
/// not one per packet and subscriber.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    slots: Vec<RecentSlot>,
    next: u64,
}

impl Recent {
    /// Keeps a payload with its incoming RTP time and marker; returns its index.
    pub fn push(&mut self, payload: Arc<[u8]>, rtp_time: u32, marker: bool) -> u64 {
        if self.slots.is_empty() {
            self.slots.resize(RECENT_LEN, RecentSlot::default());
        }
        let index = self.next;
        self.next += 1;
        self.slots[(index % RECENT_LEN as u64) as usize] = RecentSlot {
            index,
            payload: Some(payload),
            rtp_time,
            marker,
        };
        index
    }

    /// Reads the reference counts of the payloads the next `n` pushes will let go of (their
    /// memory is seconds old and out of cache) and folds them into a value that means
    /// nothing: read ahead of the pushes, with the fan-out's other reads (see
    /// `Worker::read_ahead`), the misses overlap instead of stalling each push in turn.
    pub fn touch_evicted(&self, n: usize) -> u64 {
        if self.slots.is_empty() {
            return 0;
        }
        (self.next..self.next + n.min(RECENT_LEN) as u64)
            .filter_map(|i| {
                self.slots[(i % RECENT_LEN as u64) as usize]
                    .payload
                    .as_ref()
            })
            .fold(0, |folded, payload| {
                folded ^ Arc::strong_count(payload) as u64
            })
    }

    /// The payload with index `packet`, if still kept.
    pub fn get(&self, packet: u64) -> Option<Kept<'_>> {
        let slot = self.slots.get((packet % RECENT_LEN as u64) as usize)?;
        if slot.index != packet {
            return None;
        }
        Some(Kept {
            payload: slot.payload.as_ref()?,
            rtp_time: slot.rtp_time,
            marker: slot.marker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuous_from_chosen_start() {
        let mut r = SeqRewriter::new(100, 5000, 3000);
        assert_eq!(r.rewrite(70_000, 1_000_000), Some((100, 5000)));
        assert_eq!(r.rewrite(70_001, 1_003_000), Some((101, 8000)));
        // loss upstream keeps its gap (the subscriber may NACK it)
        assert_eq!(r.rewrite(70_004, 1_009_000), Some((104, 14000)));
    }

    #[test]
    fn new_source_continues_without_jump() {
        let mut r = SeqRewriter::new(10, 0, 3000);
        r.rewrite(500, 90_000);
        r.rewrite(501, 93_000);
        // publisher restarted: seq and ts jump
        assert_eq!(r.rewrite(40_000, 7), Some((12, 3000 + 3000)));
        assert_eq!(r.rewrite(40_001, 3007), Some((13, 9000)));
    }

    #[test]
    fn explicit_switch_continues_even_with_nearby_sequence_numbers() {
        let mut r = SeqRewriter::new(10, 0, 3000);
        r.rewrite(100, 0);
        r.rewrite(101, 3000);
        r.switch_source();
        // The new source's numbers are close to the old ones: still a new source.
        assert_eq!(r.rewrite(90, 500), Some((12, 6000)));
        assert_eq!(r.rewrite(91, 3500), Some((13, 9000)));
    }

    #[test]
    fn duplicates_dropped_reorders_kept() {
        let mut r = SeqRewriter::new(10, 0, 3000);
        r.rewrite(100, 0);
        r.rewrite(102, 0);
        assert_eq!(r.rewrite(102, 0), None);
        assert_eq!(r.rewrite(101, 0).map(|x| x.0), Some(11));
        // before the stream start for this subscriber
        assert_eq!(r.rewrite(99, 0), None);
    }

    #[test]
    fn pacer_folds_requests() {
        let t0 = Instant::now();
        let mut p = KeyframePacer::default();
        assert!(p.request(t0));
        assert!(!p.request(t0 + Duration::from_millis(100)));
        assert!(p.has_deferred());
        assert!(!p.poll_deferred(t0 + Duration::from_millis(200)));
        assert!(p.poll_deferred(t0 + Duration::from_millis(500)));
        assert!(!p.has_deferred());
        assert!(!p.poll_deferred(t0 + Duration::from_millis(2000)));
    }

    /// Sends `seq` as the next packet of one stream: payload index seq + 7, RTP time offset 40.
    fn push(h: &mut History, seq: u64) {
        h.push(seq, 40, 96, seq + 7);
    }

    #[test]
    fn history_finds_recent_packets_by_their_16_bit_number_across_a_wrap() {
        let mut h = History::default();
        assert!(h.resend(5).is_none());
        for seq in 65_500..65_600u64 {
            push(&mut h, seq);
        }
        // One run: a push only counts it.
        assert_eq!(h.older.len(), 0);
        // 65,599 went out as 16-bit 63; 65,530 as itself.
        let (seq, sent) = h.resend(63).expect("held");
        assert_eq!(
            (seq, sent),
            (
                65_599,
                Sent {
                    packet: 65_606,
                    ts_offset: 40,
                    pt: 96
                }
            )
        );
        assert_eq!(h.resend(65_530).map(|s| s.0), Some(65_530));
        // Older than the history holds, or never sent.
        assert!(h.resend(65_000).is_none());
        assert!(h.resend(200).is_none());
        // Far past: out of the window.
        for seq in 65_600..(65_600 + HISTORY_LEN) {
            push(&mut h, seq);
        }
        assert!(h.resend(63).is_none());
    }

    #[test]
    fn a_broken_mapping_starts_a_run_and_each_keeps_its_own() {
        let mut h = History::default();
        push(&mut h, 10);
        push(&mut h, 11);
        // Upstream loss: outgoing 12 never sent, 13 names the next payload kept.
        h.push(13, 40, 96, 19);
        // A source switch: a new RTP time offset and payload type.
        h.push(14, 7000, 97, 20);
        push(&mut h, 15);
        assert_eq!(h.older.len(), 3);
        let sent = |h: &mut History, seq: u16| h.resend(seq).map(|(_, s)| s);
        assert_eq!(sent(&mut h, 11).map(|s| s.packet), Some(18));
        assert!(sent(&mut h, 12).is_none(), "never sent");
        assert_eq!(sent(&mut h, 13).map(|s| s.packet), Some(19));
        let switched = sent(&mut h, 14).expect("held");
        assert_eq!((switched.ts_offset, switched.pt), (7000, 97));
        assert_eq!(sent(&mut h, 15).map(|s| s.packet), Some(22));
        // Every packet its own run (another layer's packets between each): the window is
        // still covered, and runs past it are dropped.
        let mut h = History::default();
        for seq in 0..(2 * HISTORY_LEN) {
            h.push(seq, 0, 96, 3 * seq);
        }
        assert!(h.older.len() <= MAX_RUNS);
        let newest = 2 * HISTORY_LEN - 1;
        assert_eq!(
            h.resend((newest - 300) as u16).map(|(_, s)| s.packet),
            Some(3 * (newest - 300))
        );
    }

    #[test]
    fn one_packet_is_resent_at_most_max_resends_times() {
        let mut h = History::default();
        for seq in 1..=10 {
            push(&mut h, seq);
        }
        // Never sent: no answer.
        assert!(h.resend(11).is_none());
        assert!(h.resend(0).is_none());
        for _ in 0..MAX_RESENDS {
            assert!(h.resend(10).is_some());
        }
        assert!(h.resend(10).is_none());
    }

    #[test]
    fn resends_never_outnumber_the_packets_sent() {
        let mut h = History::default();
        for seq in 0..20 {
            push(&mut h, seq);
        }
        // A receiver asking for everything again and again gets at most one resend per
        // packet sent, however it spreads its requests.
        let answered = (0..20u16)
            .cycle()
            .take(1000)
            .filter(|seq| h.resend(*seq).is_some())
            .count();
        assert_eq!(answered, 20);
        push(&mut h, 20);
        assert!(h.resend(20).is_some(), "credit earned by the next packet");
    }

    #[test]
    fn recent_keeps_the_last_payloads_by_index() {
        let mut r = Recent::default();
        let mut h = History::default();
        let payload = |i: u64| Arc::<[u8]>::from(vec![i as u8; 3]);
        for i in 0..(RECENT_LEN as u64 + 10) {
            let index = r.push(payload(i), 3000 * i as u32, i % 6 == 5);
            h.push(i, 0, 96, index);
        }
        // The newest is there, with its header fields; one overwritten by a later payload
        // is not.
        let (_, newest) = h.resend((RECENT_LEN as u64 + 9) as u16).expect("held");
        let kept = r.get(newest.packet).expect("kept");
        assert_eq!(kept.payload[0], (RECENT_LEN + 9) as u8);
        assert_eq!(kept.rtp_time, 3000 * (RECENT_LEN as u32 + 9));
        assert!(kept.marker);
        assert!(r.get(5).is_none());
        assert!(Recent::default().get(5).is_none());
    }
}
