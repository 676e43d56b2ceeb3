//! The RTCP feedback the egress path answers itself: generic NACKs (RFC 4585 §6.2.1) for
//! packets str0m never saw. Everything here reads bytes a remote chose; nothing trusts a
//! length field further than the buffer.

/// Whether a datagram on the media port is (S)RTCP rather than (S)RTP: RFC 5761 §4 keeps
/// RTCP packet types in 192–223 of the second octet, away from RTP payload types.
pub(crate) fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.len() >= 8 && datagram[0] >> 6 == 2 && (192..=223).contains(&datagram[1])
}

const PT_RTPFB: u8 = 205;
const FMT_GENERIC_NACK: u8 = 1;

/// The packets of compound RTCP packet `rtcp`, in order, each whole (version 2, its length
/// field within the buffer). A malformed packet ends the walk; what came before it counts.
pub(crate) fn packets(rtcp: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = rtcp;
    std::iter::from_fn(move || {
        if rest.len() < 4 || rest[0] >> 6 != 2 {
            return None;
        }
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        let (packet, tail) = rest.split_at_checked(len)?;
        rest = tail;
        Some(packet)
    })
}

/// Calls `f(media_ssrc, seq)` for every sequence number the generic NACKs in compound
/// packet `rtcp` ask for. A malformed packet ends the walk; what came before it counts.
pub(crate) fn for_each_nack(rtcp: &[u8], mut f: impl FnMut(u32, u16)) {
    for packet in packets(rtcp) {
        if packet[1] == PT_RTPFB && packet[0] & 0x1f == FMT_GENERIC_NACK && packet.len() >= 12 {
            let media = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            for fci in packet[12..].chunks_exact(4) {
                let pid = u16::from_be_bytes([fci[0], fci[1]]);
                let blp = u16::from_be_bytes([fci[2], fci[3]]);
                f(media, pid);
                for bit in 0..16u16 {
                    if blp & (1 << bit) != 0 {
                        f(media, pid.wrapping_add(bit + 1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nacks(rtcp: &[u8]) -> Vec<(u32, u16)> {
        let mut got = Vec::new();
        for_each_nack(rtcp, |ssrc, seq| got.push((ssrc, seq)));
        got
    }

    /// A receiver report (no blocks) followed by a generic NACK with two FCI entries.
    fn compound() -> Vec<u8> {
        let mut p = vec![0x80, 201, 0, 1, 0, 0, 0, 7];
        p.extend_from_slice(&[0x81, 205, 0, 4, 0, 0, 0, 7, 0, 0, 0, 42]);
        // PID 100, BLP bits 0 and 15 (101 and 116); PID 65535, BLP bit 0 (wraps to 0).
        p.extend_from_slice(&[0, 100, 0x80, 0x01, 0xff, 0xff, 0, 1]);
        p
    }

    #[test]
    fn generic_nacks_name_the_pid_and_every_bit_of_the_mask() {
        assert!(is_rtcp(&compound()));
        assert_eq!(
            nacks(&compound()),
            vec![(42, 100), (42, 101), (42, 116), (42, 65535), (42, 0)]
        );
    }

    #[test]
    fn other_feedback_and_broken_lengths_yield_nothing_further() {
        // A PLI (PSFB, FMT 1) is not a NACK.
        assert!(nacks(&[0x81, 206, 0, 2, 0, 0, 0, 7, 0, 0, 0, 42]).is_empty());
        // A length past the buffer ends the walk; packets before it still count.
        let mut p = compound();
        p.extend_from_slice(&[0x81, 205, 0, 200, 0, 0, 0, 7, 0, 0, 0, 43, 0, 9, 0, 0]);
        assert_eq!(nacks(&p).len(), 5);
        // Truncated at every length: no panic.
        for n in 0..p.len() {
            nacks(&p[..n]);
        }
        // RTP (payload type 96 in the second octet) is not RTCP.
        assert!(!is_rtcp(&[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
