//! The receive path beside str0m: a publisher's SRTP opened here and handed to the forwarder
//! without str0m, with the feedback its sender needs written here too.
//!
//! Why: str0m's receive path (SRTP, header parse, registers, a boxed event per packet and a
//! poll after it) was the largest cost left on a meeting's media thread (docs/benchmarks.md).
//!
//! All or nothing per transport. Transport-cc numbers every RTP packet of a transport, and
//! str0m reports the numbers it did not see as lost, which would crush the sender's bandwidth
//! estimate. So once a peer takes this path (at its first RTP packet after DTLS, see
//! `Peer::handle_receive`), str0m never sees its RTP again, and this module does what str0m
//! did for it:
//! - authenticates and decrypts (RFC 7714), with a replay window per SSRC (RFC 3711 §3.3.2);
//! - records every arrival and sends transport-cc feedback (draft-holmer-rmcat-transport-
//!   wide-cc-extensions-01) every [`TWCC_INTERVAL`], reporting a late packet again as
//!   libwebrtc's receivers do;
//! - NACKs the gaps of NACK-able streams (RFC 4585 §6.2.1) and unwraps retransmissions
//!   (RFC 4588) into the stream they repair;
//! - sends receiver reports (RFC 3550 §6.4.2) with a block per stream and per RTX stream:
//!   loss, jitter, and the last sender report's time (read from a copy of the publisher's
//!   SRTCP, opened by the peer) for its RTT;
//! - learns each SSRC's m-line and simulcast layer from str0m's streams (SSRCs the SDP named)
//!   or the MID / RID / repaired-RID header extensions, and declares what it learns to str0m
//!   (`expect_stream_rx`), so keyframe requests and the publisher's RTCP stay str0m's.
//!
//! Our RTCP goes out under an SSRC of our own (see `RtcpSealer`). Everything here reads bytes
//! a remote chose: lengths are checked against the buffer, and nothing is trusted before the
//! packet authenticates.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use str0m::media::{Mid, Rid};
use str0m::rtp::{AbsCaptureTime, Extension, ExtensionValues, Ssrc, VideoOrientation};
use str0m::Rtc;

use super::srtp::{Exported, RtcpSealer, RtpOpener, TAG};
use super::{CodecSpec, RtpIn};

/// How often transport-cc feedback goes out while packets arrive (str0m's interval, which
/// this path replaces; libwebrtc's receivers send it every 50–250 ms by bitrate).
pub(crate) const TWCC_INTERVAL: Duration = Duration::from_millis(100);
/// How often missing packets are looked at for a NACK.
const NACK_TICK: Duration = Duration::from_millis(20);
/// Wait before asking again for a packet already NACKed.
const NACK_RETRY: Duration = Duration::from_millis(50);
/// How often one packet is asked for, and for how long, before giving up on it.
const NACK_TRIES: u8 = 6;
const NACK_GIVE_UP: Duration = Duration::from_millis(1000);
/// Missing packets tracked per stream. A larger gap is a jump (a new encoder, a long
/// outage): NACKing it all would only add load; the forwarder's keyframe logic handles it.
const NACK_MAX_MISSING: usize = 256;
/// Arrivals kept for transport-cc feedback before the oldest are reported (or, past a jump,
/// dropped).
const TWCC_MAX_PENDING: u64 = 8192;
/// Numbers kept after they were reported, so that a packet arriving after the report that
/// called it lost is reported again (libwebrtc keeps 500 ms; this is ~250 ms at 1,000
/// packets a second).
const TWCC_HISTORY: u64 = 256;
/// SSRCs one remote may have here (each authenticated first). Chrome uses two per m-line,
/// four per simulcast layer pair.
const MAX_REMOTE_SSRCS: usize = 256;
/// RTCP bytes per sealed datagram.
const RTCP_DATAGRAM: usize = 1100;
/// How often receiver reports go out (str0m's interval for video).
const RR_INTERVAL: Duration = Duration::from_millis(1000);

const PT_SR: u8 = 200;
const PT_RR: u8 = 201;

const PT_RTPFB: u8 = 205;
const FMT_NACK: u8 = 1;
const FMT_TWCC: u8 = 15;

/// What became of one RTP datagram.
// The packet moves straight into the forwarder: no boxing per packet (as PeerEvent).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A media packet for the forwarder.
    Rtp(RtpIn),
    /// Authentic, nothing to forward: padding, a duplicate, an SSRC or payload type not
    /// (yet) known.
    Kept,
    /// Malformed, not authentic, or a replay: dropped (and counted by the caller).
    Dropped,
}

/// The negotiated one- or two-byte extension ids this path reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ExtIds {
    pub mid: Option<u8>,
    pub rid: Option<u8>,
    pub rrid: Option<u8>,
    pub twcc: Option<u8>,
    pub capture: Option<u8>,
    pub audio_level: Option<u8>,
    pub orientation: Option<u8>,
}

impl ExtIds {
    /// The ids of a (BUNDLEd, so session-wide) extension map.
    pub fn of(map: &str0m::rtp::ExtensionMap) -> ExtIds {
        ExtIds {
            mid: map.id_of(Extension::RtpMid),
            rid: map.id_of(Extension::RtpStreamId),
            rrid: map.id_of(Extension::RepairedRtpStreamId),
            twcc: map.id_of(Extension::TransportSequenceNumber),
            capture: map.id_of(Extension::AbsoluteCaptureTime),
            audio_level: map.id_of(Extension::AudioLevel),
            orientation: map.id_of(Extension::VideoOrientation),
        }
    }
}

/// An RTP header as this path needs it; extension values are byte ranges into the packet.
#[derive(Debug, Default)]
struct Header {
    marker: bool,
    pt: u8,
    seq: u16,
    rtp_time: u32,
    ssrc: u32,
    /// Where the payload starts (after CSRCs and extensions).
    body: usize,
    padding: bool,
    twcc: Option<u16>,
    mid: Option<(usize, usize)>,
    rid: Option<(usize, usize)>,
    rrid: Option<(usize, usize)>,
    ext: ExtensionValues,
}

/// Parses an RTP header (RFC 3550 §5.1, RFC 8285 extensions). `None` if malformed.
fn parse(data: &[u8], ids: &ExtIds) -> Option<Header> {
    if data.len() < 12 || data[0] >> 6 != 2 {
        return None;
    }
    let mut h = Header {
        marker: data[1] & 0x80 != 0,
        pt: data[1] & 0x7f,
        seq: u16::from_be_bytes([data[2], data[3]]),
        rtp_time: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        ssrc: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
        body: 12 + 4 * usize::from(data[0] & 0x0f),
        padding: data[0] & 0x20 != 0,
        ..Header::default()
    };
    if data[0] & 0x10 != 0 {
        let x = data.get(h.body..h.body + 4)?;
        let profile = u16::from_be_bytes([x[0], x[1]]);
        let words = usize::from(u16::from_be_bytes([x[2], x[3]]));
        let start = h.body + 4;
        let end = start + 4 * words;
        data.get(start..end)?;
        h.body = end;
        let two_byte = profile & 0xfff0 == 0x1000;
        if profile != 0xBEDE && !two_byte {
            // Another profile's extension: skipped whole.
            return Some(h);
        }
        let mut i = start;
        while i < end {
            let (id, len, value) = if two_byte {
                if data[i] == 0 {
                    i += 1;
                    continue;
                }
                let len = usize::from(*data.get(i + 1)?);
                (data[i], len, i + 2)
            } else {
                let b = data[i];
                if b == 0 {
                    i += 1;
                    continue;
                }
                if b >> 4 == 15 {
                    break;
                }
                (b >> 4, usize::from(b & 0x0f) + 1, i + 1)
            };
            let v = data
                .get(value..value + len)
                .filter(|_| value + len <= end)?;
            h.read_extension(id, v, value, ids);
            i = value + len;
        }
    }
    (h.body <= data.len()).then_some(h)
}

impl Header {
    fn read_extension(&mut self, id: u8, v: &[u8], at: usize, ids: &ExtIds) {
        let is = |x: Option<u8>| x == Some(id);
        if is(ids.twcc) && v.len() >= 2 {
            self.twcc = Some(u16::from_be_bytes([v[0], v[1]]));
        } else if is(ids.capture) && v.len() >= 8 {
            let ntp = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            // NTP (seconds since 1900, UQ32.32) to system time.
            if let Some(secs) = (ntp >> 32).checked_sub(2_208_988_800) {
                let nanos = ((ntp & 0xffff_ffff) * 1_000_000_000) >> 32;
                let offset = v
                    .get(8..16)
                    .map(|o| i64::from_be_bytes(o.try_into().unwrap_or_default()));
                self.ext.abs_capture_time = Some(AbsCaptureTime {
                    capture_time: std::time::UNIX_EPOCH + Duration::new(secs, nanos as u32),
                    clock_offset: offset,
                });
            }
        } else if is(ids.audio_level) && !v.is_empty() {
            self.ext.audio_level = Some(-((v[0] & 0x7f) as i8));
            self.ext.voice_activity = Some(v[0] & 0x80 != 0);
        } else if is(ids.orientation) && !v.is_empty() {
            self.ext.video_orientation = Some(VideoOrientation::from(v[0] & 3));
        } else if is(ids.mid) {
            self.mid = Some((at, at + v.len()));
        } else if is(ids.rid) {
            self.rid = Some((at, at + v.len()));
        } else if is(ids.rrid) {
            self.rrid = Some((at, at + v.len()));
        }
    }
}

/// The payload's length without its padding (RFC 3550 §5.1: with the P bit, the last octet
/// counts the padding octets, itself included); `None` for a count of 0 or past the payload.
fn unpadded_len(payload: &[u8], padding: bool) -> Option<usize> {
    if !padding {
        return Some(payload.len());
    }
    let pad = usize::from(*payload.last()?);
    (pad > 0).then(|| payload.len().checked_sub(pad)).flatten()
}

/// An identifier extension's value (MID, RID) as text, if printable.
fn ident(data: &[u8], range: Option<(usize, usize)>) -> Option<&str> {
    let (a, b) = range?;
    std::str::from_utf8(data.get(a..b)?)
        .ok()
        .filter(|s| !s.is_empty())
}

/// Which indexes of one sequence space have been seen: the highest and a 128-entry window
/// below it (RFC 3711 §3.3.2). Also extends 16-bit sequence numbers (by distance from the
/// highest, RFC 3711 appendix A).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    top: Option<u64>,
    /// Bit i: index `top - i` seen.
    seen: u128,
}

impl Window {
    /// The extended index of 16-bit `seq`; `None` before index 0.
    fn index(&self, seq: u16) -> Option<u64> {
        match self.top {
            // The roll-over counter starts at 0 (RFC 3711 §3.3.1).
            None => Some(u64::from(seq)),
            Some(top) => {
                let delta = i64::from(seq.wrapping_sub(top as u16) as i16);
                u64::try_from(top as i64 + delta).ok()
            }
        }
    }

    /// Whether `index` is newer than the window or inside it and not seen.
    fn is_new(&self, index: u64) -> bool {
        match self.top {
            None => true,
            Some(top) if index > top => true,
            Some(top) => top - index < 128 && self.seen & (1 << (top - index)) == 0,
        }
    }

    fn mark(&mut self, index: u64) {
        match self.top {
            Some(top) if index <= top => {
                if top - index < 128 {
                    self.seen |= 1 << (top - index);
                }
            }
            Some(top) => {
                let shift = index - top;
                self.seen = if shift >= 128 { 0 } else { self.seen << shift };
                self.seen |= 1;
                self.top = Some(index);
            }
            None => {
                self.seen = 1;
                self.top = Some(index);
            }
        }
    }
}

/// One remote SSRC that authenticated.
#[derive(Debug)]
struct Remote {
    /// SRTP indexes seen under this SSRC.
    window: Window,
    role: Role,
}

#[derive(Debug)]
enum Role {
    /// Not known yet (a probe before its stream, a stream the remote has not named).
    Unknown,
    /// A media stream of m-line `mid`.
    Media(Box<MediaStream>),
    /// Retransmissions (RFC 4588) of stream `primary`. They have a receiver report block
    /// of their own, as libwebrtc's receivers give their RTX SSRCs (a libwebrtc sender
    /// stops naming the stream in its RTX packets' extensions once one reports it).
    Repair {
        primary: u32,
        reception: Box<Reception>,
    },
}

#[derive(Debug)]
struct MediaStream {
    mid: Mid,
    rid: Option<Rid>,
    /// What its receiver report block says.
    reception: Reception,
    /// Indexes handed to the forwarder (first transmissions and retransmissions alike).
    delivered: Window,
    /// Gaps to NACK, on streams whose payload type takes NACKs.
    nacks: Option<Nacks>,
}

/// What one payload type is, from the negotiated codecs.
#[derive(Debug, Clone, Copy)]
enum PtInfo {
    Media {
        codec: Option<CodecSpec>,
        nack: bool,
    },
    /// RTX for payload type `of`.
    Repair {
        of: u8,
    },
    Unknown,
}

/// The packets missing from one stream, oldest first.
#[derive(Debug, Default)]
struct Nacks {
    top: Option<u64>,
    missing: VecDeque<Missing>,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    index: u64,
    since: Instant,
    tries: u8,
    last: Option<Instant>,
}

impl Nacks {
    /// Packet `index` arrived (first transmission or retransmission). True if it opened a
    /// gap (a NACK is due soon).
    fn arrived(&mut self, index: u64, now: Instant) -> bool {
        let Some(top) = self.top else {
            self.top = Some(index);
            return false;
        };
        if index > top {
            let gap = index - top - 1;
            self.top = Some(index);
            if gap as usize > NACK_MAX_MISSING {
                self.missing.clear();
                return false;
            }
            for i in top + 1..index {
                self.missing.push_back(Missing {
                    index: i,
                    since: now,
                    tries: 0,
                    last: None,
                });
            }
            while self.missing.len() > NACK_MAX_MISSING {
                self.missing.pop_front();
            }
            gap > 0
        } else {
            if let Ok(at) = self.missing.binary_search_by_key(&index, |m| m.index) {
                self.missing.remove(at);
            }
            false
        }
    }

    /// Whether `index` is among the packets still missing.
    fn is_missing(&self, index: u64) -> bool {
        self.missing
            .binary_search_by_key(&index, |m| m.index)
            .is_ok()
    }

    /// The indexes to NACK now; forgets those asked for too often or too long.
    fn due(&mut self, now: Instant, out: &mut Vec<u64>) {
        out.clear();
        self.missing.retain(|m| {
            m.tries < NACK_TRIES && now.saturating_duration_since(m.since) < NACK_GIVE_UP
        });
        for m in &mut self.missing {
            if m.last
                .is_none_or(|l| now.saturating_duration_since(l) >= NACK_RETRY)
            {
                m.tries += 1;
                m.last = Some(now);
                out.push(m.index);
            }
        }
    }
}

/// What one stream's receiver report block (RFC 3550 §6.4.1) says: counts of the packets on
/// its own SSRC (retransmissions come on the RTX SSRC and count as repairs, not receptions,
/// as libwebrtc's receivers count them), interarrival jitter, the last sender report.
#[derive(Debug, Default)]
struct Reception {
    /// First and highest extended sequence numbers received.
    base: Option<u64>,
    max: u64,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    /// RFC 3550 A.8: jitter in RTP ticks, times 16.
    jitter: u32,
    last_transit: Option<u32>,
    /// The middle 32 bits of the last sender report's NTP time, and when it came.
    last_sr: Option<(u32, Instant)>,
}

impl Reception {
    /// A packet on the stream's SSRC: `index` its extended sequence number, `arrival` the
    /// arrival time in the stream's RTP ticks.
    fn arrived(&mut self, index: u64, rtp_time: u32, arrival: u32) {
        let base = *self.base.get_or_insert(index);
        if index < base {
            self.base = Some(index);
        }
        self.max = self.max.max(index);
        self.received += 1;
        let transit = arrival.wrapping_sub(rtp_time);
        if let Some(last) = self.last_transit {
            let d = transit.wrapping_sub(last) as i32;
            let d = d.unsigned_abs();
            // J += (|D| - J) / 16, in sixteenths.
            self.jitter = self
                .jitter
                .wrapping_add(d)
                .wrapping_sub((self.jitter + 8) >> 4);
        }
        self.last_transit = Some(transit);
    }

    /// Appends the 24-byte report block for `ssrc`, if packets came since the last one
    /// (RFC 3550 §6.4: blocks for the sources heard from since the last report).
    fn write_block(&mut self, ssrc: u32, now: Instant, out: &mut Vec<u8>) -> bool {
        let Some(base) = self.base.filter(|_| self.received > self.received_prior) else {
            return false;
        };
        let expected = self.max - base + 1;
        let lost = expected as i64 - self.received as i64;
        let lost = lost.clamp(-0x80_0000, 0x7f_ffff) as i32;
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received - self.received_prior;
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        let fraction = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64).min(255) as u8
        };
        out.extend_from_slice(&ssrc.to_be_bytes());
        out.push(fraction);
        out.extend_from_slice(&lost.to_be_bytes()[1..]);
        out.extend_from_slice(&(self.max as u32).to_be_bytes());
        out.extend_from_slice(&(self.jitter >> 4).to_be_bytes());
        let (lsr, dlsr) = match self.last_sr {
            Some((lsr, at)) => {
                let delay = now.saturating_duration_since(at);
                (lsr, (delay.as_micros() * 65_536 / 1_000_000) as u32)
            }
            None => (0, 0),
        };
        out.extend_from_slice(&lsr.to_be_bytes());
        out.extend_from_slice(&dlsr.to_be_bytes());
        true
    }
}

/// Arrivals waiting for transport-cc feedback, and the last numbers reported.
///
/// A packet that arrives after a report called it lost is reported again, as libwebrtc's
/// receivers do: the next report starts at its number (and repeats the arrivals after it
/// that were reported already), so the sender does not count a reordered packet as lost.
#[derive(Debug)]
struct TwccFeedback {
    /// Transport-wide number of `arrivals[0]`, extended.
    base: u64,
    /// Where the next report starts, extended: numbers below it were reported, and are
    /// kept (up to [`TWCC_HISTORY`]) for late arrivals.
    next: u64,
    /// Highest number recorded, extended.
    last: Option<u64>,
    /// Each number's arrival in 250 µs ticks since `epoch` (transport-cc's delta unit),
    /// plus one (0: not received), wrapping at 2^32 ticks (12 days) as the 24-bit reference
    /// time of 64 ms does.
    arrivals: VecDeque<Option<NonZeroU32>>,
    /// Arrivals at `next` or after: what the next report carries.
    received: usize,
    /// Zero of the reference time (the first arrival).
    epoch: Option<Instant>,
    count: u8,
    last_report: Instant,
}

/// Transport-cc's delta unit, 250 µs, and reference time unit, 64 ms (= 256 deltas).
const TICK_US: u128 = 250;
const REF_TICKS: u32 = 256;

impl TwccFeedback {
    fn new(now: Instant) -> TwccFeedback {
        TwccFeedback {
            base: 0,
            next: 0,
            last: None,
            arrivals: VecDeque::new(),
            received: 0,
            epoch: None,
            count: 0,
            last_report: now,
        }
    }

    fn record(&mut self, seq: u16, now: Instant) {
        let ext = match self.last {
            None => (1 << 16) | u64::from(seq),
            Some(last) => {
                let delta = i64::from(seq.wrapping_sub(last as u16) as i16);
                match u64::try_from(last as i64 + delta) {
                    Ok(e) => e,
                    Err(_) => return,
                }
            }
        };
        if self.last.is_none() {
            self.base = ext;
            self.next = ext;
        }
        if ext < self.base {
            // Older than the numbers kept: too late to matter to the sender.
            return;
        }
        if ext >= self.next && ext - self.next >= TWCC_MAX_PENDING {
            // A jump: what waits is dropped rather than reported as thousands lost.
            self.arrivals.clear();
            self.received = 0;
            self.base = ext;
            self.next = ext;
        }
        let at = (ext - self.base) as usize;
        if at >= self.arrivals.len() {
            self.arrivals.resize(at + 1, None);
        }
        if self.arrivals[at].is_none() {
            let epoch = *self.epoch.get_or_insert(now);
            let ticks = (now.saturating_duration_since(epoch).as_micros() / TICK_US) as u32;
            let stored = NonZeroU32::new(ticks.wrapping_add(1)).unwrap_or(NonZeroU32::MIN);
            self.arrivals[at] = Some(stored);
            if ext >= self.next {
                self.received += 1;
            } else {
                // Reported lost already: report again from here.
                let from = (self.next - self.base) as usize;
                self.received += 1 + self.arrivals.range(at + 1..from).flatten().count();
                self.next = ext;
            }
        }
        self.last = Some(self.last.map_or(ext, |l| l.max(ext)));
    }

    /// When the next feedback is due, if anything waits for one.
    fn due(&self) -> Option<Instant> {
        (self.received > 0).then(|| self.last_report + TWCC_INTERVAL)
    }

    /// Appends feedback packets for everything up to the last arrival recorded; how many.
    fn report(&mut self, sender: u32, media: u32, now: Instant, out: &mut Vec<u8>) -> u64 {
        self.last_report = now;
        let mut packets = 0;
        while self.received > 0 {
            let from = (self.next - self.base) as usize;
            // A long run of losses before the next arrival would not fit one report: the
            // oldest of them go unreported (the sender times them out).
            let lost = self
                .arrivals
                .range(from..)
                .take_while(|a| a.is_none())
                .count();
            if lost > 1000 {
                self.next += lost as u64;
                continue;
            }
            let Some(first) = self.arrivals.range(from..).flatten().next() else {
                return packets;
            };
            let reference = first.get().wrapping_sub(1) / REF_TICKS;
            let mut prev = reference.wrapping_mul(REF_TICKS);
            let mut statuses: Vec<u8> = Vec::new();
            let mut deltas: Vec<u8> = Vec::new();
            let mut taken = 0;
            let mut reported = 0;
            // Up to the last received arrival: the numbers after it may still come.
            let mut remaining = self.received;
            for a in self.arrivals.range(from..) {
                if remaining == 0 || statuses.len() == 0xffff {
                    break;
                }
                if statuses.len().div_ceil(7) * 2 + deltas.len() + 2 > RTCP_DATAGRAM - 40 {
                    break;
                }
                match a {
                    None => statuses.push(0),
                    Some(t) => {
                        let t = t.get().wrapping_sub(1);
                        let d = i64::from(t.wrapping_sub(prev) as i32);
                        if (0..=255).contains(&d) {
                            statuses.push(1);
                            deltas.push(d as u8);
                        } else if let Ok(d) = i16::try_from(d) {
                            statuses.push(2);
                            deltas.extend_from_slice(&d.to_be_bytes());
                        } else {
                            // Too far from the previous: starts the next report.
                            break;
                        }
                        prev = t;
                        remaining -= 1;
                        reported += 1;
                    }
                }
                taken += 1;
            }
            if reported == 0 {
                // A gap too wide for a delta before the first arrival: cannot happen (the
                // reference is the first arrival's); guard the loop anyway.
                return packets;
            }
            let start = out.len();
            out.extend_from_slice(&[0x80 | FMT_TWCC, PT_RTPFB, 0, 0]);
            out.extend_from_slice(&sender.to_be_bytes());
            out.extend_from_slice(&media.to_be_bytes());
            out.extend_from_slice(&(self.next as u16).to_be_bytes());
            out.extend_from_slice(&(statuses.len() as u16).to_be_bytes());
            out.extend_from_slice(&(reference & 0x00ff_ffff).to_be_bytes()[1..]);
            out.push(self.count);
            self.count = self.count.wrapping_add(1);
            // Two-bit status vector chunks, seven statuses each.
            for chunk in statuses.chunks(7) {
                let mut c: u16 = 0xC000;
                for (i, s) in chunk.iter().enumerate() {
                    c |= u16::from(*s) << (12 - 2 * i);
                }
                out.extend_from_slice(&c.to_be_bytes());
            }
            out.extend_from_slice(&deltas);
            pad_rtcp(out, start);
            self.next += taken as u64;
            self.received -= reported;
            packets += 1;
        }
        // Keep the last TWCC_HISTORY numbers reported, for late arrivals.
        let kept = (self.next - self.base).saturating_sub(TWCC_HISTORY) as usize;
        self.arrivals.drain(..kept.min(self.arrivals.len()));
        self.base += kept as u64;
        packets
    }
}

/// Pads the RTCP packet that starts at `start` to whole words (RFC 3550 §6.4.1: P bit, the
/// count in the last octet) and writes its length field.
fn pad_rtcp(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    let pad = (4 - len % 4) % 4;
    if pad > 0 {
        out.resize(out.len() + pad, 0);
        let last = out.len() - 1;
        out[last] = pad as u8;
        out[start] |= 0x20;
    }
    let words = ((out.len() - start) / 4 - 1) as u16;
    out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
}

/// Appends a generic NACK (RFC 4585 §6.2.1) for `indexes` (ascending) of `media`.
fn write_nack(sender: u32, media: u32, indexes: &[u64], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0x80 | FMT_NACK, PT_RTPFB, 0, 0]);
    out.extend_from_slice(&sender.to_be_bytes());
    out.extend_from_slice(&media.to_be_bytes());
    let mut i = 0;
    while i < indexes.len() {
        let pid = indexes[i];
        let mut blp = 0u16;
        i += 1;
        while i < indexes.len() && indexes[i] - pid <= 16 {
            blp |= 1 << (indexes[i] - pid - 1);
            i += 1;
        }
        out.extend_from_slice(&(pid as u16).to_be_bytes());
        out.extend_from_slice(&blp.to_be_bytes());
    }
    pad_rtcp(out, start);
}

/// What the receive path did, counted since the owner last took the counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressCounts {
    /// Sequence numbers NACKed (each asking counted).
    pub nacked: u64,
    /// Retransmissions unwrapped into their stream.
    pub rtx: u64,
    /// Transport-cc feedback packets sent.
    pub feedback: u64,
    /// Authentic packets already delivered (retransmissions of packets that came after
    /// all): not forwarded again.
    pub duplicates: u64,
}

/// One peer's receive path beside str0m.
pub(crate) struct Ingress {
    counts: IngressCounts,
    opener: RtpOpener,
    sealer: RtcpSealer,
    /// The sender SSRC of our feedback.
    ssrc: u32,
    /// The first media SSRC learned: transport-cc feedback names it (receivers ignore it).
    first_media: u32,
    ids: Option<ExtIds>,
    pts: FxHashMap<u8, PtInfo>,
    remotes: FxHashMap<u32, Remote>,
    twcc: TwccFeedback,
    /// The next look at missing packets, while any are.
    nack_at: Option<Instant>,
    /// When the last receiver report went out, and whether any stream has one to give.
    last_rr: Instant,
    reporting: bool,
    /// Zero of the arrival times in RTP ticks (jitter).
    epoch: Instant,
    indexes: Vec<u64>,
    /// Sealed SRTCP waiting for `Peer::poll`.
    out: VecDeque<Vec<u8>>,
    /// Whether a packet made this path declare or remove one of str0m's streams since
    /// [`Ingress::take_touched_str0m`].
    touched_str0m: bool,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("ssrc", &self.ssrc)
            .field("remotes", &self.remotes.len())
            .finish()
    }
}

/// `now` in RTP ticks of `codec`'s clock (90 kHz if unknown) since `epoch`, wrapping: the
/// arrival times that interarrival jitter compares.
fn rtp_ticks(epoch: Instant, now: Instant, codec: Option<CodecSpec>) -> u32 {
    let rate = codec.map_or(90_000, |c| u128::from(c.clock_rate.get()));
    let since = now.saturating_duration_since(epoch).as_nanos();
    (since * rate / 1_000_000_000) as u32
}

/// Whether an SRTCP datagram starts with a sender report (its first header is in the
/// clear): the only ones the receive path needs opened.
pub(crate) fn starts_with_sender_report(datagram: &[u8]) -> bool {
    datagram.len() >= 8 && datagram[1] == PT_SR
}

impl Ingress {
    /// The path for a peer whose DTLS exported `exported`; `None` for a profile the SRTP
    /// module does not implement (the peer then stays with str0m).
    pub fn new(
        exported: &Exported,
        provider: &dyn str0m::crypto::SrtpProvider,
        now: Instant,
    ) -> Option<Ingress> {
        Some(Ingress {
            counts: IngressCounts::default(),
            opener: RtpOpener::new(exported, provider)?,
            sealer: RtcpSealer::new(exported, provider)?,
            ssrc: rand::random_range(1..u32::MAX),
            first_media: 0,
            ids: None,
            pts: FxHashMap::default(),
            remotes: FxHashMap::default(),
            twcc: TwccFeedback::new(now),
            nack_at: None,
            last_rr: now,
            reporting: false,
            epoch: now,
            indexes: Vec::new(),
            out: VecDeque::new(),
            touched_str0m: false,
        })
    }

    /// The negotiation changed: extension ids and payload types are read again.
    pub fn renegotiated(&mut self) {
        self.ids = None;
        self.pts.clear();
    }

    /// When [`Ingress::handle_timeout`] must run next.
    pub fn deadline(&self) -> Option<Instant> {
        let rr = self.reporting.then(|| self.last_rr + RR_INTERVAL);
        [self.twcc.due(), self.nack_at, rr]
            .into_iter()
            .flatten()
            .min()
    }

    /// Reads the sender reports in a compound RTCP packet the remote sent (opened from its
    /// SRTCP by the peer; str0m gets the datagram as usual): their times go into the
    /// receiver reports' LSR and DLSR.
    pub fn read_sender_reports(&mut self, rtcp: &[u8], now: Instant) {
        for packet in super::feedback::packets(rtcp) {
            if packet[1] == PT_SR && packet.len() >= 20 {
                let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                // The middle 32 bits of the 64-bit NTP time.
                let lsr = u32::from_be_bytes([packet[10], packet[11], packet[12], packet[13]]);
                if let Some(Role::Media(m)) = self.remotes.get_mut(&ssrc).map(|r| &mut r.role) {
                    m.reception.last_sr = Some((lsr, now));
                }
            }
        }
    }

    /// Whether str0m's state changed since the last call (its deadline may have).
    pub fn take_touched_str0m(&mut self) -> bool {
        std::mem::take(&mut self.touched_str0m)
    }

    /// The counts since the last call.
    pub fn take_counts(&mut self) -> IngressCounts {
        std::mem::take(&mut self.counts)
    }

    /// A sealed feedback datagram to send, if any.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Handles one RTP datagram of this peer. `mids`: the peer's m-lines (for the extension
    /// ids before any SSRC is known).
    pub fn receive(&mut self, rtc: &mut Rtc, mids: &[Mid], data: &[u8], now: Instant) -> Verdict {
        let ids = match self.ids {
            Some(ids) => ids,
            None => {
                let ids = mids
                    .iter()
                    .find_map(|m| rtc.media(*m))
                    .map(|m| ExtIds::of(m.remote_extmap()))
                    .unwrap_or_default();
                self.ids = Some(ids);
                ids
            }
        };
        let Some(h) = parse(data, &ids) else {
            return Verdict::Dropped;
        };
        let window = match self.remotes.get(&h.ssrc) {
            Some(r) => r.window,
            None if self.remotes.len() >= MAX_REMOTE_SSRCS => return Verdict::Dropped,
            None => Window::default(),
        };
        let Some(index) = window.index(h.seq) else {
            return Verdict::Dropped;
        };
        if !window.is_new(index) {
            return Verdict::Dropped;
        }
        // The ciphertext is copied once, into the payload's own buffer, and opened there.
        let Some(sealed) = data.len().checked_sub(TAG).filter(|n| *n >= h.body) else {
            return Verdict::Dropped;
        };
        let mut plain: Arc<[u8]> = Arc::from(&data[h.body..sealed]);
        let Some(buf) = Arc::get_mut(&mut plain) else {
            return Verdict::Dropped;
        };
        let (header, tag) = (&data[..h.body], &data[sealed..]);
        if !self.opener.open(header, buf, tag, h.ssrc, index) {
            return Verdict::Dropped;
        }
        // Authentic from here on.
        let remote = self.remotes.entry(h.ssrc).or_insert(Remote {
            window: Window::default(),
            role: Role::Unknown,
        });
        remote.window.mark(index);
        let unknown = matches!(remote.role, Role::Unknown);
        if let Some(seq) = h.twcc {
            self.twcc.record(seq, now);
        }
        let Some(len) = unpadded_len(&plain, h.padding) else {
            return Verdict::Dropped;
        };
        let info = self.pt_info(rtc, h.pt);
        if unknown {
            self.touched_str0m = true;
            let (role, replaced) = resolve(rtc, &self.remotes, h.ssrc, info, &h, data);
            if let Some(old) = replaced {
                // Its NACKs and report blocks end with it.
                self.remotes.remove(&old);
            }
            if matches!(role, Role::Media(_)) {
                if self.first_media == 0 {
                    self.first_media = h.ssrc;
                }
                // The SDP may name this stream's RTX SSRC: known from now on too.
                let rtx = rtc
                    .direct_api()
                    .stream_rx(&Ssrc::from(h.ssrc))
                    .and_then(|rx| rx.rtx());
                if let Some(rtx) = rtx {
                    let r = self.remotes.entry(*rtx).or_insert(Remote {
                        window: Window::default(),
                        role: Role::Unknown,
                    });
                    if matches!(r.role, Role::Unknown) {
                        r.role = Role::Repair {
                            primary: h.ssrc,
                            reception: Box::default(),
                        };
                    }
                }
            }
            if let Some(r) = self.remotes.get_mut(&h.ssrc) {
                r.role = role;
            }
        }
        let role = self.remotes.get_mut(&h.ssrc).map(|r| &mut r.role);
        let (primary, index, payload, codec) = match (role, info) {
            (Some(Role::Media(_)), PtInfo::Media { codec, .. }) => (h.ssrc, index, 0..len, codec),
            (Some(Role::Repair { primary, reception }), PtInfo::Repair { of }) => {
                // The repaired stream's payload type was seen (and looked up) before the
                // repair could be placed.
                let codec = match self.pts.get(&of) {
                    Some(PtInfo::Media { codec, .. }) => *codec,
                    _ => None,
                };
                // Every packet on the RTX SSRC counts in its report block, padding too.
                let arrival = rtp_ticks(self.epoch, now, codec);
                reception.arrived(index, h.rtp_time, arrival);
                self.reporting = true;
                let primary = *primary;
                // RFC 4588 §4: the original sequence number, then the original payload.
                if len < 2 {
                    return Verdict::Kept;
                }
                let osn = u16::from_be_bytes([plain[0], plain[1]]);
                let Some(p) = self.remotes.get(&primary) else {
                    return Verdict::Kept;
                };
                let Some(original) = p.window.index(osn) else {
                    return Verdict::Kept;
                };
                (primary, original, 2..len, codec)
            }
            _ => return Verdict::Kept,
        };
        let Some(Role::Media(media)) = self.remotes.get_mut(&primary).map(|r| &mut r.role) else {
            return Verdict::Kept;
        };
        // Not delivered yet: newer than the window or unseen in it, or a packet still
        // missing that is older (a late retransmission on a fast stream).
        let missing = media.nacks.as_ref().is_some_and(|n| n.is_missing(index));
        if !media.delivered.is_new(index) && !missing {
            self.counts.duplicates += 1;
            return Verdict::Kept;
        }
        if primary != h.ssrc {
            self.counts.rtx += 1;
        } else {
            let arrival = rtp_ticks(self.epoch, now, codec);
            media.reception.arrived(index, h.rtp_time, arrival);
            self.reporting = true;
        }
        media.delivered.mark(index);
        if let Some(nacks) = &mut media.nacks {
            if nacks.arrived(index, now) && self.nack_at.is_none() {
                self.nack_at = Some(now);
            }
        }
        if payload.is_empty() {
            // Padding on the media SSRC (bandwidth probes): it holds a number, no media.
            return Verdict::Kept;
        }
        Verdict::Rtp(RtpIn {
            mid: media.mid,
            rid: media.rid,
            codec,
            seq: index,
            rtp_time: h.rtp_time,
            marker: h.marker,
            ext: h.ext,
            // Cut (a copy) only where padding or an RTX header surrounds the payload.
            payload: if payload.len() == plain.len() {
                plain
            } else {
                Arc::from(&plain[payload])
            },
        })
    }

    fn pt_info(&mut self, rtc: &Rtc, pt: u8) -> PtInfo {
        if let Some(info) = self.pts.get(&pt) {
            return *info;
        }
        let config = rtc.codec_config();
        let info = if let Some(p) = config.find(|p| *p.pt() == pt) {
            PtInfo::Media {
                codec: Some(p.spec()),
                nack: p.fb_nack() && p.resend().is_some(),
            }
        } else if let Some(p) = config.find(|p| p.resend().is_some_and(|r| *r == pt)) {
            PtInfo::Repair { of: *p.pt() }
        } else {
            PtInfo::Unknown
        };
        self.pts.insert(pt, info);
        info
    }

    /// Sends the feedback that is due: transport-cc, then NACKs.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut rtcp = Vec::new();
        if self.reporting && self.last_rr + RR_INTERVAL <= now {
            self.last_rr = now;
            // A peer that stopped sending stops waking the worker (its next packet wakes
            // the reports again).
            self.reporting = self.write_receiver_reports(now, &mut rtcp);
        }
        if self.twcc.due().is_some_and(|t| t <= now) {
            self.counts.feedback += self
                .twcc
                .report(self.ssrc, self.first_media, now, &mut rtcp);
        }
        if self.nack_at.is_some_and(|t| t <= now) {
            let mut any = false;
            let mut indexes = std::mem::take(&mut self.indexes);
            for (ssrc, remote) in &mut self.remotes {
                let Role::Media(media) = &mut remote.role else {
                    continue;
                };
                let Some(nacks) = &mut media.nacks else {
                    continue;
                };
                nacks.due(now, &mut indexes);
                if !indexes.is_empty() {
                    write_nack(self.ssrc, *ssrc, &indexes, &mut rtcp);
                    self.counts.nacked += indexes.len() as u64;
                }
                any |= !nacks.missing.is_empty();
            }
            self.indexes = indexes;
            self.nack_at = any.then(|| now + NACK_TICK);
        }
        self.seal(&rtcp);
    }

    /// Appends receiver reports (31 blocks each at most) for every stream heard from since
    /// the last; whether there was any.
    fn write_receiver_reports(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        let mut blocks = Vec::new();
        for (ssrc, remote) in &mut self.remotes {
            let reception = match &mut remote.role {
                Role::Media(m) => &mut m.reception,
                Role::Repair { reception, .. } => reception,
                Role::Unknown => continue,
            };
            reception.write_block(*ssrc, now, &mut blocks);
        }
        for chunk in blocks.chunks(31 * 24) {
            let start = out.len();
            out.extend_from_slice(&[0x80 | (chunk.len() / 24) as u8, PT_RR, 0, 0]);
            out.extend_from_slice(&self.ssrc.to_be_bytes());
            out.extend_from_slice(chunk);
            pad_rtcp(out, start);
        }
        !blocks.is_empty()
    }

    /// Seals compound `rtcp` into datagrams of at most [`RTCP_DATAGRAM`] bytes, splitting
    /// between packets.
    fn seal(&mut self, rtcp: &[u8]) {
        let (mut start, mut len) = (0, 0);
        for packet in super::feedback::packets(rtcp) {
            if len > 0 && len + packet.len() > RTCP_DATAGRAM {
                self.seal_datagram(&rtcp[start..start + len]);
                (start, len) = (start + len, 0);
            }
            len += packet.len();
        }
        if len > 0 {
            self.seal_datagram(&rtcp[start..start + len]);
        }
    }

    fn seal_datagram(&mut self, rtcp: &[u8]) {
        let mut datagram = Vec::with_capacity(rtcp.len() + TAG + 4);
        if self.sealer.seal(rtcp, &mut datagram) {
            self.out.push_back(datagram);
        }
    }
}

/// The role of a newly authenticated SSRC: from str0m's streams (SSRCs the SDP named, or
/// ones declared here before) or the MID / RID / repaired-RID extensions. What it learns it
/// declares to str0m. Also the SSRC it replaced as its layer's stream, if any.
fn resolve(
    rtc: &mut Rtc,
    remotes: &FxHashMap<u32, Remote>,
    ssrc: u32,
    info: PtInfo,
    h: &Header,
    data: &[u8],
) -> (Role, Option<u32>) {
    let mid = ident(data, h.mid).map(Mid::from);
    let receiving = |rtc: &Rtc, mid: Mid| {
        rtc.media(mid)
            .is_some_and(|m| !m.disabled() && m.direction().is_receiving())
    };
    let mut replaced = None;
    let role = match info {
        PtInfo::Media { nack, .. } => {
            let known = rtc
                .direct_api()
                .stream_rx(&Ssrc::from(ssrc))
                .map(|rx| (rx.mid(), rx.rid()));
            let (mid, rid) = match known {
                Some(k) => k,
                None => {
                    let Some(mid) = mid.filter(|m| receiving(rtc, *m)) else {
                        return (Role::Unknown, None);
                    };
                    let rid = ident(data, h.rid).map(Rid::from);
                    let mut api = rtc.direct_api();
                    // A new SSRC for a layer replaces the old one (keyframe requests must
                    // reach the one that sends).
                    let old = api.stream_rx_by_mid(mid, rid).map(|rx| *rx.ssrc());
                    if let Some(old) = old.filter(|o| *o != ssrc) {
                        api.remove_stream_rx(Ssrc::from(old));
                        replaced = Some(old);
                    }
                    api.expect_stream_rx(Ssrc::from(ssrc), None, mid, rid);
                    (mid, rid)
                }
            };
            Role::Media(Box::new(MediaStream {
                mid,
                rid,
                reception: Reception::default(),
                delivered: Window::default(),
                nacks: nack.then(Nacks::default),
            }))
        }
        PtInfo::Repair { .. } => {
            let Some(mid) = mid.filter(|m| receiving(rtc, *m)) else {
                return (Role::Unknown, None);
            };
            let rid = ident(data, h.rrid).map(Rid::from);
            let mut api = rtc.direct_api();
            let Some(primary) = api.stream_rx_by_mid(mid, rid).map(|rx| *rx.ssrc()) else {
                return (Role::Unknown, None);
            };
            if !remotes.contains_key(&primary) {
                return (Role::Unknown, None);
            }
            api.expect_stream_rx(Ssrc::from(primary), Some(Ssrc::from(ssrc)), mid, rid);
            Role::Repair {
                primary,
                reception: Box::default(),
            }
        }
        PtInfo::Unknown => Role::Unknown,
    };
    (role, replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: ExtIds = ExtIds {
        mid: Some(4),
        rid: Some(10),
        rrid: Some(11),
        twcc: Some(3),
        capture: Some(7),
        audio_level: Some(1),
        orientation: None,
    };

    /// An RTP packet with one-byte extensions `elements` (id, value) and `payload`.
    fn rtp(seq: u16, ssrc: u32, elements: &[(u8, &[u8])], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0x80 | 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&1234u32.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        if !elements.is_empty() {
            p[0] |= 0x10;
            let mut body = Vec::new();
            for (id, v) in elements {
                body.push((id << 4) | (v.len() as u8 - 1));
                body.extend_from_slice(v);
            }
            body.resize(body.len().div_ceil(4) * 4, 0);
            p.extend_from_slice(&[0xBE, 0xDE]);
            p.extend_from_slice(&((body.len() / 4) as u16).to_be_bytes());
            p.extend_from_slice(&body);
        }
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn headers_give_the_values_this_path_reads_and_never_read_past_the_buffer() {
        let ntp = ((2_208_988_800u64 + 10) << 32) | 0x8000_0000;
        let p = rtp(
            7,
            0xabc,
            &[
                (3, &[0x01, 0x02]),
                (4, b"1"),
                (10, b"h"),
                (1, &[0x80 | 30]),
                (7, &ntp.to_be_bytes()),
            ],
            &[9, 9, 9],
        );
        let h = parse(&p, &IDS).expect("parses");
        assert_eq!((h.seq, h.ssrc, h.pt, h.marker), (7, 0xabc, 96, true));
        assert_eq!(h.twcc, Some(0x0102));
        assert_eq!(ident(&p, h.mid), Some("1"));
        assert_eq!(ident(&p, h.rid), Some("h"));
        assert_eq!(ident(&p, h.rrid), None);
        assert_eq!(
            (h.ext.audio_level, h.ext.voice_activity),
            (Some(-30), Some(true))
        );
        let capture = h.ext.abs_capture_time.expect("capture time");
        assert_eq!(
            capture.capture_time,
            std::time::UNIX_EPOCH + Duration::from_millis(10_500)
        );
        assert_eq!(&p[h.body..], &[9, 9, 9]);
        // Two-byte header form (RFC 8285 §4.3), with padding between elements.
        let mut two = vec![0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0x10, 0x00, 0, 2];
        two.extend_from_slice(&[3, 2, 0xff, 0xfe, 0, 4, 1, b'x', 0xAA]);
        let h = parse(&two, &IDS).expect("parses");
        assert_eq!(h.twcc, Some(0xfffe));
        assert_eq!(ident(&two, h.mid), Some("x"));
        assert_eq!(&two[h.body..], &[0xAA]);
        // An element running past the extension block's length is malformed.
        let mut long = two.clone();
        long[22] = 2;
        assert!(parse(&long, &IDS).is_none());
        // Every truncation and a lying extension length: no panic, no reading past the end.
        for n in 0..p.len() {
            let _ = parse(&p[..n], &IDS);
        }
        let mut lying = p.clone();
        lying[15] = 200;
        assert!(parse(&lying, &IDS).is_none());
        // Not version 2.
        assert!(parse(&[0x40; 20], &IDS).is_none());
    }

    #[test]
    fn padding_is_cut_by_its_count_and_a_bad_count_refused() {
        assert_eq!(unpadded_len(&[1, 2, 3], false), Some(3));
        assert_eq!(unpadded_len(&[1, 2, 0, 0, 3], true), Some(2));
        // Padding only (a bandwidth probe): nothing left.
        assert_eq!(unpadded_len(&[0, 0, 3], true), Some(0));
        assert_eq!(unpadded_len(&[1, 2, 0], true), None, "a count of 0");
        assert_eq!(unpadded_len(&[1, 9], true), None, "more than the payload");
        assert_eq!(unpadded_len(&[], true), None);
    }

    #[test]
    fn the_window_extends_sequence_numbers_and_refuses_replays_and_old_packets() {
        let mut w = Window::default();
        assert_eq!(
            w.index(65_530),
            Some(65_530),
            "the roll-over counter starts at 0"
        );
        w.mark(65_530);
        // Across the wrap: the next roll-over.
        assert_eq!(w.index(3), Some(65_539));
        assert!(w.is_new(65_539));
        w.mark(65_539);
        // Reordered just before: still new, then a replay.
        assert_eq!(w.index(65_535), Some(65_535));
        assert!(w.is_new(65_535));
        w.mark(65_535);
        assert!(!w.is_new(65_535));
        assert!(!w.is_new(65_539));
        // Older than the 128-packet window: refused.
        w.mark(65_539 + 200);
        assert!(!w.is_new(65_539 + 200 - 128));
        assert!(w.is_new(65_539 + 200 - 127));
        // Below index 0 there is nothing.
        let mut low = Window::default();
        low.mark(3);
        assert_eq!(low.index(65_000), None);
    }

    #[test]
    fn gaps_are_nacked_again_after_a_while_until_they_arrive_or_are_given_up() {
        let t0 = Instant::now();
        let mut n = Nacks::default();
        assert!(!n.arrived(100, t0));
        assert!(n.arrived(104, t0), "101..=103 missing");
        let mut due = Vec::new();
        n.due(t0, &mut due);
        assert_eq!(due, vec![101, 102, 103]);
        // Not again before the retry interval; 102 arrives (a retransmission).
        n.due(t0 + NACK_RETRY / 2, &mut due);
        assert!(due.is_empty());
        assert!(!n.arrived(102, t0));
        n.due(t0 + NACK_RETRY, &mut due);
        assert_eq!(due, vec![101, 103]);
        // After NACK_TRIES asks, or NACK_GIVE_UP, a packet is given up.
        let mut t = t0 + NACK_RETRY;
        for _ in 2..NACK_TRIES {
            t += NACK_RETRY;
            n.due(t, &mut due);
            assert_eq!(due, vec![101, 103]);
        }
        n.due(t + NACK_RETRY, &mut due);
        assert!(due.is_empty() && n.missing.is_empty());
        // A jump larger than NACK_MAX_MISSING is not NACKed at all.
        assert!(!n.arrived(104 + NACK_MAX_MISSING as u64 + 2, t0));
        assert!(n.missing.is_empty());
        // The NACK names a PID and a bitmask of the 16 following.
        let mut out = Vec::new();
        write_nack(1, 2, &[10, 11, 26, 27, 40], &mut out);
        let mut got = Vec::new();
        super::super::feedback::for_each_nack(&out, |ssrc, seq| got.push((ssrc, seq)));
        assert_eq!(got, [10, 11, 26, 27, 40].map(|s| (2, s)));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn report_blocks_count_losses_since_the_last_report_and_carry_the_sender_report_time() {
        let t0 = Instant::now();
        let mut r = Reception::default();
        let mut out = Vec::new();
        assert!(
            !r.write_block(7, t0, &mut out),
            "nothing received, no block"
        );
        // 100..=109 with 103 and 104 missing; constant transit (no jitter).
        for i in (100u64..110).filter(|i| *i != 103 && *i != 104) {
            let ts = (i as u32) * 3000;
            r.arrived(i, ts, ts + 500);
        }
        r.last_sr = Some((0x1234_5678, t0));
        assert!(r.write_block(7, t0 + Duration::from_millis(500), &mut out));
        assert_eq!(out.len(), 24);
        assert_eq!(u32::from_be_bytes(out[0..4].try_into().unwrap()), 7);
        assert_eq!(out[4], 51, "fraction lost: 2 of 10, in 256ths (512 / 10)");
        assert_eq!(out[5..8], [0, 0, 2], "cumulative lost");
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), 109);
        assert_eq!(
            u32::from_be_bytes(out[12..16].try_into().unwrap()),
            0,
            "jitter"
        );
        assert_eq!(
            u32::from_be_bytes(out[16..20].try_into().unwrap()),
            0x1234_5678
        );
        assert_eq!(
            u32::from_be_bytes(out[20..24].try_into().unwrap()),
            32_768,
            "half a second"
        );
        // The next interval: nothing lost; a late packet (a reordered 103) makes the
        // cumulative count one smaller. Transit varying by 160 ticks: jitter grows by 10.
        let mut out = Vec::new();
        r.arrived(103, 103 * 3000, 103 * 3000 + 660);
        r.arrived(110, 110 * 3000, 110 * 3000 + 500);
        assert!(r.write_block(7, t0, &mut out));
        assert_eq!(out[4], 0);
        assert_eq!(out[5..8], [0, 0, 1]);
        let jitter = u32::from_be_bytes(out[12..16].try_into().unwrap());
        assert!((15..=25).contains(&jitter), "jitter {jitter}");
        // Nothing since: no block (a stream that stopped drops out of the reports).
        assert!(!r.write_block(7, t0, &mut out));
        assert_eq!(out.len(), 24);
    }

    #[test]
    fn receiver_reports_have_a_block_for_each_media_and_rtx_ssrc_heard_from() {
        let t0 = Instant::now();
        let exported = Exported {
            material: (0..2 * (16 + 12) as u8).collect(),
            profile: dimpl::SrtpProfile::AEAD_AES_128_GCM,
            active: false,
        };
        let provider = super::super::dtls::crypto_provider().srtp_provider;
        let mut ingress = Ingress::new(&exported, provider, t0).expect("GCM");
        let remote = |role| Remote {
            window: Window::default(),
            role,
        };
        let mut media = MediaStream {
            mid: Mid::from("0"),
            rid: None,
            reception: Reception::default(),
            delivered: Window::default(),
            nacks: None,
        };
        media.reception.arrived(10, 0, 0);
        let mut repairs = Reception::default();
        repairs.arrived(500, 0, 0);
        repairs.arrived(502, 0, 0);
        ingress
            .remotes
            .insert(1, remote(Role::Media(Box::new(media))));
        ingress.remotes.insert(
            2,
            remote(Role::Repair {
                primary: 1,
                reception: Box::new(repairs),
            }),
        );
        ingress.remotes.insert(3, remote(Role::Unknown));
        let mut out = Vec::new();
        assert!(ingress.write_receiver_reports(t0, &mut out));
        assert_eq!((out[0] & 0x1f, out[1]), (2, PT_RR), "two blocks");
        assert_eq!(
            u32::from_be_bytes(out[4..8].try_into().unwrap()),
            ingress.ssrc
        );
        let mut blocks: Vec<(u32, u8)> = out[8..]
            .chunks(24)
            .map(|b| (u32::from_be_bytes(b[0..4].try_into().unwrap()), b[4]))
            .collect();
        blocks.sort();
        // The RTX stream lost 501 of 500..=502: a third, in 256ths.
        assert_eq!(blocks, vec![(1, 0), (2, 85)]);
    }

    /// Decodes a transport-cc feedback packet: base, reference time, fb count, and per
    /// status the arrival in 250 µs ticks since the reference (None: not received).
    fn decode_twcc(p: &[u8]) -> (u16, u32, u8, Vec<Option<i64>>) {
        assert_eq!((p[0] & 0x1f, p[1]), (FMT_TWCC, PT_RTPFB));
        assert_eq!(
            (usize::from(u16::from_be_bytes([p[2], p[3]])) + 1) * 4,
            p.len()
        );
        let base = u16::from_be_bytes([p[12], p[13]]);
        let count = usize::from(u16::from_be_bytes([p[14], p[15]]));
        let reference = u32::from_be_bytes([0, p[16], p[17], p[18]]);
        let mut statuses = Vec::new();
        let mut i = 20;
        while statuses.len() < count {
            let c = u16::from_be_bytes([p[i], p[i + 1]]);
            assert_eq!(c >> 14, 0b11, "two-bit status vector chunks");
            for k in 0..7 {
                if statuses.len() < count {
                    statuses.push((c >> (12 - 2 * k)) & 3);
                }
            }
            i += 2;
        }
        let mut at = 0i64;
        let mut out = Vec::new();
        for s in statuses {
            match s {
                0 => out.push(None),
                1 => {
                    at += i64::from(p[i]);
                    i += 1;
                    out.push(Some(at));
                }
                2 => {
                    at += i64::from(i16::from_be_bytes([p[i], p[i + 1]]));
                    i += 2;
                    out.push(Some(at));
                }
                _ => panic!("reserved status"),
            }
        }
        if p[0] & 0x20 != 0 {
            assert_eq!(usize::from(p[p.len() - 1]), p.len() - i, "padding count");
        } else {
            assert_eq!(i, p.len());
        }
        (base, reference, p[19], out)
    }

    #[test]
    fn transport_cc_feedback_reports_arrivals_losses_and_large_deltas() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = TwccFeedback::new(t0);
        assert_eq!(f.due(), None);
        f.record(65_534, t0);
        f.record(65_535, t0 + ms(1));
        // 0 and 1 lost; 2 a long while later (a two-byte delta); 3 reordered before 2.
        f.record(3, t0 + ms(2));
        f.record(2, t0 + ms(100));
        assert_eq!(f.due(), Some(t0 + TWCC_INTERVAL));
        let mut out = Vec::new();
        f.report(9, 5, t0 + ms(120), &mut out);
        let (base, reference, count, arrivals) = decode_twcc(&out);
        assert_eq!((base, reference, count), (65_534, 0, 0));
        assert_eq!(
            arrivals,
            vec![Some(0), Some(4), None, None, Some(400), Some(8)],
            "ticks of 250 µs since the reference (0 ms)"
        );
        assert_eq!(u32::from_be_bytes(out[4..8].try_into().unwrap()), 9);
        assert_eq!(f.due(), None, "everything reported");
        // A packet reported lost that comes late is reported again, as libwebrtc's
        // receivers do: the next report starts at its number and repeats the arrivals
        // reported since, with the next feedback count.
        f.record(0, t0 + ms(130));
        f.record(5, t0 + ms(200));
        let mut out = Vec::new();
        assert_eq!(f.report(9, 5, t0 + ms(220), &mut out), 1);
        let (base, reference, count, arrivals) = decode_twcc(&out);
        // 130 ms is 2 * 64 ms + 2 ms: the reference is 2, 0 arrived 8 ticks after it, the
        // others before it (negative deltas), 5 at 200 ms.
        assert_eq!((base, reference, count), (0, 2, 1));
        assert_eq!(
            arrivals,
            vec![Some(8), None, Some(-112), Some(-504), None, Some(288)]
        );
        assert_eq!(f.due(), None, "everything reported");
        // A duplicate of a number reported as received changes nothing.
        f.record(2, t0 + ms(230));
        assert_eq!(f.due(), None);
        // Many arrivals: split into packets that each fit a datagram.
        for i in (0..3000u16).filter(|i| *i != 2899) {
            f.record(
                6 + i,
                t0 + ms(300) + Duration::from_micros(u64::from(i) * 100),
            );
        }
        let mut out = Vec::new();
        f.report(9, 5, t0 + ms(700), &mut out);
        let mut rest = &out[..];
        let mut total = 0;
        while !rest.is_empty() {
            let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
            assert!(len <= RTCP_DATAGRAM);
            total += decode_twcc(&rest[..len]).3.len();
            rest = &rest[len..];
        }
        assert_eq!(total, 3000);
        // Only the last TWCC_HISTORY numbers reported are kept for late arrivals: 4 (lost
        // long ago) is not reported again, 2905 (lost 100 numbers before the last) is.
        f.record(4, t0 + ms(710));
        assert_eq!(f.due(), None, "too late");
        f.record(2905, t0 + ms(730));
        let mut out = Vec::new();
        assert_eq!(f.report(9, 5, t0 + ms(800), &mut out), 1);
        let arrivals = decode_twcc(&out).3;
        assert_eq!(decode_twcc(&out).0, 2905, "from the late number");
        assert_eq!(arrivals.len(), 101, "2905 to 3005");
        assert!(arrivals.iter().all(Option::is_some));
    }

    #[test]
    fn transport_cc_arrival_times_wrap_with_the_reference_time() {
        // 2^32 ticks of 250 µs (~12.4 days) after the first packet the stored times wrap,
        // as the 24-bit reference time (2^24 units of 64 ms) does: deltas stay right.
        let t0 = Instant::now();
        let tick = Duration::from_micros(250);
        let mut f = TwccFeedback::new(t0);
        f.record(1, t0);
        let mut out = Vec::new();
        f.report(9, 5, t0, &mut out);
        let late = t0 + tick * (u32::MAX - 1);
        f.record(2, late);
        f.record(3, late + tick * 3);
        let mut out = Vec::new();
        assert_eq!(f.report(9, 5, late + tick * 4, &mut out), 1);
        let (base, reference, _, arrivals) = decode_twcc(&out);
        assert_eq!((base, reference), (2, 0x00ff_ffff));
        // u32::MAX - 1 is 254 ticks past the last reference; the next arrival is 3 later.
        assert_eq!(arrivals, vec![Some(254), Some(257)]);
    }

    #[test]
    fn feedback_is_sealed_in_datagrams_that_split_between_packets() {
        let material: Vec<u8> = (0..2 * (16 + 12) as u8).collect();
        let exported = Exported {
            material,
            profile: dimpl::SrtpProfile::AEAD_AES_128_GCM,
            active: false,
        };
        let provider = super::super::dtls::crypto_provider().srtp_provider;
        let mut ingress = Ingress::new(&exported, provider, Instant::now()).expect("GCM");
        let mut rtcp = Vec::new();
        for _ in 0..30 {
            write_nack(
                ingress.ssrc,
                1,
                &(0..200).step_by(17).collect::<Vec<_>>(),
                &mut rtcp,
            );
        }
        ingress.seal(&rtcp);
        let datagrams: Vec<Vec<u8>> = std::iter::from_fn(|| ingress.poll_datagram()).collect();
        assert!(datagrams.len() > 1);
        // Each opens with the keys of the other side (the remote's view of ours).
        let remote = Exported {
            active: true,
            ..exported
        };
        let mut opener = super::super::srtp::Opener::new(&remote, provider).expect("GCM");
        let mut opened = Vec::new();
        for d in &datagrams {
            assert!(d.len() <= RTCP_DATAGRAM + 16 + 4);
            let mut plain = Vec::new();
            assert!(opener.open(d, &mut plain));
            opened.extend_from_slice(&plain);
        }
        assert_eq!(opened, rtcp);
    }
}
