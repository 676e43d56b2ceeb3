//! The physical limit: a plaintext UDP fan-out relay (no ICE, DTLS or SRTP), with the same
//! packet sizes and topology as the SFU runs, batching its I/O (`recvmmsg` up to 64
//! datagrams, `sendmmsg` 64 copies per call, and one UDP GSO send for a destination's
//! equal-sized copies within a batch, as the SFU does) in a tight loop on one pinned core.
//!
//! Protocol: a subscriber sends `SUB` + group id (u32) to register and `UNS` + group id to
//! leave; every other datagram is media whose first 4 bytes are its group id and is copied
//! to that group's subscribers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Datagrams read or written per system call.
const BATCH: usize = 64;
/// Segments per UDP GSO send (as the SFU's media worker).
const GSO_SEGMENTS: usize = 32;

/// Runs the relay until `limit` passes (bounded: it stops by itself). Reads up to 64
/// datagrams per `recvmmsg` and writes the copies 64 per `sendmmsg`.
pub fn run_relay(ip: IpAddr, port: u16, limit: Duration) -> std::io::Result<()> {
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        recvmmsg, sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrIn,
    };

    // Opened as the SFU opens its media sockets (4 MB buffers, don't-fragment), so the relay
    // takes the SFU's kernel path.
    let sock = opencalls_sfu::udp::bind(SocketAddr::new(ip, port))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let fd = sock.as_raw_fd();
    let mut groups: HashMap<u32, Vec<SockaddrIn>> = HashMap::new();
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut rx_headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let mut tx_headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let mut received: Vec<(usize, SockaddrIn)> = Vec::with_capacity(BATCH);
    let mut out: Vec<(usize, SockaddrIn)> = Vec::with_capacity(BATCH * 16);
    let mut singles: Vec<(usize, SockaddrIn)> = Vec::with_capacity(BATCH * 16);
    let mut scratch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let end = Instant::now() + limit;
    while Instant::now() < end {
        received.clear();
        {
            let mut iovs: Vec<[IoSliceMut; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            let Ok(res) = recvmmsg(
                fd,
                &mut rx_headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) else {
                continue; // timeout or a transient error
            };
            for m in res {
                if let Some(a) = m.address {
                    received.push((m.bytes, a));
                }
            }
        }
        out.clear();
        for (i, (n, from)) in received.iter().enumerate() {
            let b = &bufs[i][..*n];
            if b.len() >= 7 && &b[..3] == b"SUB" {
                let g = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                let list = groups.entry(g).or_default();
                if !list.contains(from) {
                    list.push(*from);
                }
            } else if b.len() >= 7 && &b[..3] == b"UNS" {
                let g = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                if let Some(list) = groups.get_mut(&g) {
                    list.retain(|a| a != from);
                }
            } else if b.len() >= 4 {
                let g = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if let Some(list) = groups.get(&g) {
                    out.extend(list.iter().map(|to| (i, *to)));
                }
            }
        }
        // Like the SFU's media worker: a destination's equal-sized packets (its copies of
        // one frame) leave as one UDP GSO send; the rest 64 per sendmmsg.
        out.sort_by_key(|(_, a)| (a.ip(), a.port()));
        singles.clear();
        let mut k = 0;
        while k < out.len() {
            let (first, to) = out[k];
            let size = received[first].0;
            // Equal-sized copies to the same destination, a shorter one ending the run.
            let mut end = k + 1;
            while end < out.len() && end - k < GSO_SEGMENTS && out[end].1 == to {
                let n = received[out[end].0].0;
                if n > size {
                    break;
                }
                end += 1;
                if n < size {
                    break;
                }
            }
            if end - k == 1 {
                singles.push((first, to));
            } else {
                scratch.clear();
                for (i, _) in &out[k..end] {
                    scratch.extend_from_slice(&bufs[*i][..received[*i].0]);
                }
                let segment = size as u16;
                let _ = sendmsg(
                    fd,
                    &[IoSlice::new(&scratch)],
                    &[ControlMessage::UdpGsoSegments(&segment)],
                    MsgFlags::empty(),
                    Some(&to),
                );
            }
            k = end;
        }
        for chunk in singles.chunks(BATCH) {
            let slices: Vec<[IoSlice; 1]> = chunk
                .iter()
                .map(|(i, _)| [IoSlice::new(&bufs[*i][..received[*i].0])])
                .collect();
            let addrs: Vec<Option<SockaddrIn>> = chunk.iter().map(|(_, a)| Some(*a)).collect();
            let _ = sendmmsg(
                fd,
                &mut tx_headers,
                slices.iter(),
                &addrs,
                [],
                MsgFlags::empty(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn recv(sock: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    #[test]
    fn relay_fans_out_to_subscribers_until_they_leave() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let relay = std::thread::spawn(move || run_relay(ip, port, Duration::from_secs(3)));
        let to = SocketAddr::new(ip, port);
        let sub = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sub.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let publisher = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let media = [0, 0, 0, 7, 1, 2, 3, 4];
        // Subscribe (resent until the relay, starting up, has seen it), then media flows.
        let mut got = None;
        for _ in 0..10 {
            sub.send_to(b"SUB\0\0\0\x07", to).expect("send");
            std::thread::sleep(Duration::from_millis(20));
            publisher.send_to(&media, to).expect("send");
            got = recv(&sub);
            if got.is_some() {
                break;
            }
        }
        assert_eq!(got.as_deref(), Some(&media[..]));
        // Back-to-back packets of one group (one GSO send when they share a batch) arrive
        // as separate datagrams, in order, the shorter last one included.
        let frame: Vec<Vec<u8>> = vec![
            vec![0, 0, 0, 7, 1, 1, 1],
            vec![0, 0, 0, 7, 2, 2, 2],
            vec![0, 0, 0, 7, 3],
        ];
        for p in &frame {
            publisher.send_to(p, to).expect("send");
        }
        for p in &frame {
            assert_eq!(recv(&sub).as_deref(), Some(&p[..]));
        }
        // Another group does not reach this subscriber.
        publisher.send_to(&[0, 0, 0, 8, 9], to).expect("send");
        assert_eq!(recv(&sub), None);
        // After UNS nothing more arrives.
        sub.send_to(b"UNS\0\0\0\x07", to).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        publisher.send_to(&media, to).expect("send");
        assert_eq!(recv(&sub), None);
        relay.join().expect("relay thread").expect("relay");
    }
}
