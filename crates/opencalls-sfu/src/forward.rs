//! Per-subscription rewriting and per-publication keyframe pacing.
//!
//! A subscriber must see one continuous RTP stream per m-line whatever happens upstream
//! (publisher restarts, track re-pointed, SSRC change), so every subscription rewrites
//! sequence numbers and timestamps. Keyframe requests from many subscribers are folded
//! into at most one per publication per [`KEYFRAME_INTERVAL`].

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
}
