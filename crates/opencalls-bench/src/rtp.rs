//! Measuring received media without decrypting it: RTP headers (and their extensions) are
//! plaintext in SRTP, so a light subscriber reads sequence numbers and the publisher's
//! capture time straight from the datagram.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Now as NTP Q32.32.
pub fn ntp_now() -> u64 {
    ntp_of(SystemTime::now())
}

/// A time as NTP Q32.32.
pub fn ntp_of(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    ((d.as_secs() + NTP_UNIX_OFFSET) << 32) | frac
}

/// Milliseconds from NTP `then` to NTP `now`.
pub fn ntp_delta_ms(then: u64, now: u64) -> f64 {
    (now.wrapping_sub(then) as i64) as f64 * 1000.0 / 4_294_967_296.0
}

/// RTP (not RTCP, STUN or DTLS), per RFC 7983 and RFC 5761.
pub fn is_rtp(b: &[u8]) -> bool {
    b.len() >= 12 && (128..192).contains(&b[0]) && !(192..=223).contains(&b[1])
}

/// (ssrc, sequence number, abs-capture-time NTP if present under extension `abs_id`).
pub fn parse(b: &[u8], abs_id: Option<u8>) -> Option<(u32, u16, Option<u64>)> {
    if !is_rtp(b) {
        return None;
    }
    let cc = usize::from(b[0] & 0x0f);
    let seq = u16::from_be_bytes([b[2], b[3]]);
    let ssrc = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    let mut off = 12 + 4 * cc;
    let mut capture = None;
    if b[0] & 0x10 != 0 && b.len() >= off + 4 {
        let profile = u16::from_be_bytes([b[off], b[off + 1]]);
        let words = usize::from(u16::from_be_bytes([b[off + 2], b[off + 3]]));
        off += 4;
        let ext = b.get(off..off + 4 * words)?;
        let mut i = 0;
        while i < ext.len() {
            let (id, len, hdr) = if profile == 0xBEDE {
                if ext[i] == 0 {
                    i += 1;
                    continue;
                }
                (ext[i] >> 4, usize::from(ext[i] & 0x0f) + 1, 1)
            } else if profile & 0xfff0 == 0x1000 && i + 1 < ext.len() {
                if ext[i] == 0 {
                    i += 1;
                    continue;
                }
                (ext[i], usize::from(ext[i + 1]), 2)
            } else {
                break;
            };
            if id == 15 && profile == 0xBEDE {
                break;
            }
            let val = ext.get(i + hdr..i + hdr + len)?;
            if Some(id) == abs_id && val.len() >= 8 {
                capture = Some(u64::from_be_bytes(val[..8].try_into().ok()?));
            }
            i += hdr + len;
        }
    }
    Some((ssrc, seq, capture))
}

/// Received-packet accounting for one measurement window.
#[derive(Default)]
pub struct Meter {
    /// RTP packets received.
    pub packets: u64,
    streams: HashMap<(usize, u32), Stream>,
    /// Added latency samples in ms: the publisher's send to the generator's read.
    latency_ms: Vec<f64>,
    /// The same packets' publisher's send to the kernel queueing them on the subscriber's
    /// socket, when the sockets are stamped (`--socket-times`, rx.rs).
    socket_latency_ms: Vec<f64>,
}

/// One received packet's times, NTP Q32.32.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// The publisher's send time carried in the packet.
    pub sent: u64,
    /// When the kernel queued it on the subscriber's socket, if stamped.
    pub queued: Option<u64>,
    /// When the generator read it.
    pub read: u64,
}

#[derive(Default)]
struct Stream {
    first: Option<u64>,
    max: u64,
    count: u64,
    last16: u16,
    roc: u64,
}

impl Meter {
    /// Records one packet of stream `ssrc` at receiver `rx`.
    pub fn record(&mut self, rx: usize, ssrc: u32, seq: u16, times: Option<Times>) {
        self.packets += 1;
        let s = self.streams.entry((rx, ssrc)).or_default();
        if s.first.is_some() && seq < 0x4000 && s.last16 > 0xC000 {
            s.roc += 1;
        }
        s.last16 = seq;
        let ext = (s.roc << 16) | u64::from(seq);
        if s.first.is_none() {
            s.first = Some(ext);
            s.max = ext;
        }
        s.max = s.max.max(ext);
        s.count += 1;
        if let Some(t) = times {
            // Keep memory bounded on long steps: every packet up to 200k, then 1 in 8.
            if self.latency_ms.len() < 200_000 || self.packets.is_multiple_of(8) {
                self.latency_ms.push(ntp_delta_ms(t.sent, t.read));
                if let Some(q) = t.queued {
                    self.socket_latency_ms.push(ntp_delta_ms(t.sent, q));
                }
            }
        }
    }

    /// Fraction of packets missing inside each stream's observed range.
    pub fn loss(&self) -> f64 {
        let (mut expected, mut got) = (0u64, 0u64);
        for s in self.streams.values() {
            if let Some(first) = s.first {
                expected += s.max - first + 1;
                got += s.count;
            }
        }
        if expected == 0 {
            return 0.0;
        }
        (expected.saturating_sub(got)) as f64 / expected as f64
    }

    /// A percentile of the added latency (to the generator's read).
    pub fn percentile(&mut self, p: f64) -> Option<f64> {
        percentile(&mut self.latency_ms, p)
    }

    /// A percentile of the latency to the kernel's queueing on the socket (if stamped).
    pub fn socket_percentile(&mut self, p: f64) -> Option<f64> {
        percentile(&mut self.socket_latency_ms, p)
    }
}

/// The `p` percentile of `v` (sorts it).
pub fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_byte_extension() {
        let mut p = vec![0x90, 96, 0x12, 0x34, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        p.extend_from_slice(&[0xBE, 0xDE, 0, 3]);
        p.push((7 << 4) | 7);
        p.extend_from_slice(&42u64.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0]);
        p.extend_from_slice(b"payload");
        assert_eq!(parse(&p, Some(7)), Some((0xdeadbeef, 0x1234, Some(42))));
        assert_eq!(parse(&p, Some(3)), Some((0xdeadbeef, 0x1234, None)));
        for n in 0..p.len() {
            let _ = parse(&p[..n], Some(7)); // never panics
        }
    }

    #[test]
    fn loss_counts_gaps() {
        let mut m = Meter::default();
        for s in [1u16, 2, 4, 5] {
            m.record(0, 9, s, None);
        }
        assert!((m.loss() - 0.2).abs() < 1e-9);
    }
}
