//! Just enough STUN (RFC 8489) to demultiplex a datagram from an address we do not know
//! yet: is it a binding request, and whose ICE username fragment does it name?
//!
//! Everything else about STUN (integrity, fingerprint, responses) is str0m's job once the
//! datagram has been handed to the right session.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;

/// Whether the first byte says STUN (RFC 7983 demultiplexing: 0..=3).
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| *b < 4)
}

/// For a binding request, the local (our) ufrag from `USERNAME` = `ours:theirs`.
pub fn binding_request_ufrag(buf: &[u8]) -> Option<&str> {
    if buf.len() < 20 || buf[4..8] != MAGIC_COOKIE {
        return None;
    }
    let msg_type = u16::from_be_bytes([buf[0], buf[1]]);
    if msg_type != BINDING_REQUEST {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let body = buf.get(20..20 + len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let attr = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + alen)?;
        if attr == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next().filter(|u| !u.is_empty());
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// Whether a datagram we are about to send is a binding success response: proof that
/// str0m verified the request's credentials for the destination address.
pub fn is_binding_success(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] == 0x01 && buf[1] == 0x01 && buf[4..8] == MAGIC_COOKIE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(username: &[u8]) -> Vec<u8> {
        let padded = username.len().div_ceil(4) * 4;
        let mut b = vec![0x00, 0x01];
        b.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[7; 12]);
        b.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        b.extend_from_slice(&(username.len() as u16).to_be_bytes());
        b.extend_from_slice(username);
        b.resize(20 + 4 + padded, 0);
        b
    }

    #[test]
    fn finds_local_ufrag() {
        assert_eq!(binding_request_ufrag(&request(b"abcd:xyz")), Some("abcd"));
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        let full = request(b"abcd:xyz");
        for n in 0..full.len() {
            // Must never panic, whatever the cut.
            let _ = binding_request_ufrag(&full[..n]);
        }
        assert_eq!(binding_request_ufrag(&full[..22]), None);
        assert_eq!(binding_request_ufrag(&[0u8; 20]), None);
        let mut lying = full.clone();
        lying[2] = 0xff; // length beyond the datagram
        assert_eq!(binding_request_ufrag(&lying), None);
        assert_eq!(binding_request_ufrag(&request(b":x")), None);
    }

    #[test]
    fn classifies_first_byte() {
        assert!(looks_like_stun(&[0, 1]));
        assert!(!looks_like_stun(&[0x80])); // RTP
        assert!(!looks_like_stun(&[22])); // DTLS
        assert!(!looks_like_stun(&[]));
    }
}
