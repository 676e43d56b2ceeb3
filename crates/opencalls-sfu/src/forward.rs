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

/// Packets kept for retransmission per subscription: about 2.7 s of 1.5 Mbit/s video
/// (190 packets a second), more than any NACK asks for (a NACK older than a round trip or
/// two is useless).
const HISTORY_LEN: usize = 512;

/// How often one packet may be sent again: a receiver re-asks when a retransmission is
/// lost too; past this its requests are not loss but abuse (each answer costs us a packet).
const MAX_RESENDS: u8 = 3;

/// One packet as it left for a subscriber (outgoing numbering), 16 bytes: four to a cache
/// line, since every subscriber writes one per packet. The payload stays in the track's
/// [`Recent`], named by `packet`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sent {
    /// The low 32 bits of its extended sequence number.
    seq: u32,
    /// The low 32 bits of its payload's index in the track's [`Recent`].
    packet: u32,
    pub rtp_time: u32,
    pub pt: u8,
    pub marker: bool,
    /// Times sent again; an empty slot reads as resent enough.
    resends: u8,
}

/// The last [`HISTORY_LEN`] packets sent to one subscriber, by outgoing sequence number.
/// Its entries name payloads in the [`Recent`] of the track it was pulling then.
#[derive(Debug, Default)]
pub(crate) struct History {
    slots: Vec<Sent>,
    latest: u64,
}

impl History {
    /// Remembers a packet just sent: outgoing number `seq`, payload `packet` in the track's
    /// [`Recent`].
    pub fn push(&mut self, seq: u64, rtp_time: u32, marker: bool, pt: u8, packet: u64) {
        if self.slots.is_empty() {
            let empty = Sent {
                resends: MAX_RESENDS,
                ..Sent::default()
            };
            self.slots.resize(HISTORY_LEN, empty);
        }
        self.latest = self.latest.max(seq);
        self.slots[(seq % HISTORY_LEN as u64) as usize] = Sent {
            seq: seq as u32,
            packet: packet as u32,
            rtp_time,
            pt,
            marker,
            resends: 0,
        };
    }

    /// Reads the slot the next `push` writes, for `Subscription::touch`.
    pub fn touch(&self) -> u64 {
        let next = (self.latest.wrapping_add(1) % HISTORY_LEN as u64) as usize;
        self.slots.get(next).map_or(0, |s| u64::from(s.seq))
    }

    /// The packet a NACK names by its 16-bit sequence number, with its extended number, if
    /// still held and not sent again too often already; counts the resend.
    pub fn resend(&mut self, seq: u16) -> Option<(u64, Sent)> {
        // The extended number closest below or at the newest one sent.
        let mut ext = (self.latest & !0xffff) | u64::from(seq);
        if ext > self.latest {
            ext = ext.checked_sub(1 << 16)?;
        }
        let slot = (ext % HISTORY_LEN as u64) as usize;
        let sent = self.slots.get_mut(slot)?;
        if sent.seq != ext as u32 || sent.resends >= MAX_RESENDS {
            return None;
        }
        sent.resends += 1;
        Some((ext, *sent))
    }
}

/// Payloads kept per track and worker for its subscribers' retransmissions: the last
/// [`HISTORY_LEN`] of the track (~2.7 s of 1.5 Mbit/s video; spread over its simulcast
/// layers, still more than a NACK round trip). Every payload held costs its size for that
/// long: 2048 held 2.3 MB per video track.
const RECENT_LEN: usize = HISTORY_LEN;

/// The payloads one track's subscribers on a worker were recently sent, held once for all
/// of them (each subscriber's [`History`] names them by index): one reference per packet,
/// not one per packet and subscriber.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    slots: Vec<(u64, Option<Arc<[u8]>>)>,
    next: u64,
}

impl Recent {
    /// Keeps a payload; returns its index.
    pub fn push(&mut self, payload: Arc<[u8]>) -> u64 {
        if self.slots.is_empty() {
            self.slots.resize(RECENT_LEN, (0, None));
        }
        let index = self.next;
        self.next += 1;
        self.slots[(index % RECENT_LEN as u64) as usize] = (index, Some(payload));
        index
    }

    /// The payload a [`Sent`] names, if still kept.
    pub fn get(&self, sent: &Sent) -> Option<&Arc<[u8]>> {
        // RECENT_LEN (a power of two) divides 2^32, so the low 32 bits find the slot.
        let (index, payload) = self.slots.get(sent.packet as usize % RECENT_LEN)?;
        (*index as u32 == sent.packet).then_some(payload.as_ref()?)
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

    fn push(h: &mut History, seq: u64) {
        h.push(seq, seq as u32 * 3000, false, 96, seq + 7);
    }

    #[test]
    fn history_finds_recent_packets_by_their_16_bit_number_across_a_wrap() {
        let mut h = History::default();
        assert!(h.resend(5).is_none());
        for seq in 65_500..65_600u64 {
            push(&mut h, seq);
        }
        // 65,599 went out as 16-bit 63; 65,530 as itself.
        let (seq, sent) = h.resend(63).expect("held");
        assert_eq!(
            (seq, sent.rtp_time, sent.packet),
            (65_599, 65_599 * 3000, 65_606)
        );
        assert_eq!(h.resend(65_530).map(|s| s.0), Some(65_530));
        // Older than the history holds, or never sent.
        assert!(h.resend(65_000).is_none());
        assert!(h.resend(200).is_none());
        // Far past: overwritten slots do not answer for their old number.
        for seq in 65_600..(65_600 + HISTORY_LEN as u64) {
            push(&mut h, seq);
        }
        assert!(h.resend(63).is_none());
    }

    #[test]
    fn one_packet_is_resent_at_most_max_resends_times() {
        let mut h = History::default();
        push(&mut h, 10);
        // Never-written slots do not answer.
        assert!(h.resend(11).is_none());
        assert!(h.resend(9).is_none());
        for _ in 0..MAX_RESENDS {
            assert!(h.resend(10).is_some());
        }
        assert!(h.resend(10).is_none());
    }

    #[test]
    fn recent_keeps_the_last_payloads_by_index() {
        let mut r = Recent::default();
        let mut h = History::default();
        let payload = |i: u64| Arc::<[u8]>::from(vec![i as u8; 3]);
        for i in 0..(RECENT_LEN as u64 + 10) {
            let index = r.push(payload(i));
            h.push(i, 0, false, 96, index);
        }
        // The newest is there; one overwritten by a later payload is not.
        let (_, newest) = h.resend((RECENT_LEN as u64 + 9) as u16).expect("held");
        assert_eq!(r.get(&newest).map(|p| p[0]), Some((RECENT_LEN + 9) as u8));
        let old = Sent {
            packet: 5,
            ..Sent::default()
        };
        assert!(r.get(&old).is_none());
        assert!(Recent::default().get(&old).is_none());
    }
}
