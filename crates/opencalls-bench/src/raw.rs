//! The physical limit: a plaintext UDP fan-out relay (no ICE, DTLS or SRTP), with the same
//! packet sizes and topology as the SFU runs. Receives with `recvfrom` and sends one
//! `sendto` per subscriber, in a tight loop on one pinned core.
//!
//! Protocol: a subscriber sends `SUB` + group id (u32) to register; every other datagram is
//! media whose first 4 bytes are its group id and is copied to that group's subscribers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Runs the relay until `limit` passes (bounded: it stops by itself).
pub fn run_relay(ip: IpAddr, port: u16, limit: Duration) -> std::io::Result<()> {
    let sock = bind_with_buffers(SocketAddr::new(ip, port))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut groups: HashMap<u32, Vec<SocketAddr>> = HashMap::new();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n >= 7 && &buf[..3] == b"SUB" {
            let g = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
            let list = groups.entry(g).or_default();
            if !list.contains(&from) {
                list.push(from);
            }
            continue;
        }
        if n < 4 {
            continue;
        }
        let g = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if let Some(list) = groups.get(&g) {
            for to in list {
                let _ = sock.send_to(&buf[..n], to);
            }
        }
    }
    Ok(())
}

/// The same 4 MB kernel buffers the SFU's media sockets get.
pub fn bind_with_buffers(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}
