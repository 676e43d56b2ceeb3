//! How a media UDP socket is opened: the one place that sets its kernel options, used by
//! the media workers and by the benchmark's raw relay and load generator alike (so the
//! relay that stands for the physical limit takes the same kernel path as the SFU).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};
use socket2::{Domain, Socket, Type};

/// Kernel socket buffer size for media sockets: keyframe bursts from many publishers
/// must not overflow the default (~200 KB) receive buffer.
pub const SOCKET_BUFFER: usize = 4 << 20;

// `IP_MTU_DISCOVER` / `IPV6_MTU_DISCOVER` (an int, ip(7) / ipv6(7)); nix has no wrapper for
// them, and this keeps the workspace free of `unsafe` in its own code.
sockopt_impl!(
    /// IPv4 path-MTU discovery mode of a socket.
    IpMtuDiscover,
    Both,
    libc::IPPROTO_IP,
    libc::IP_MTU_DISCOVER,
    usize
);
sockopt_impl!(
    /// IPv6 path-MTU discovery mode of a socket.
    Ipv6MtuDiscover,
    Both,
    libc::IPPROTO_IPV6,
    libc::IPV6_MTU_DISCOVER,
    usize
);

/// Datagrams the kernel dropped at `sock` since it was opened because its receive queue was
/// full (what a worker that cannot keep up loses, handshakes of new sessions among them);
/// `None` where the kernel does not say.
pub fn receive_drops(sock: &impl AsFd) -> Option<u64> {
    meminfo::drops(sock.as_fd())
}

cfg_if::cfg_if! {
    // Linux architectures whose socket options come from asm-generic/socket.h.
    if #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "x86",
            target_arch = "arm"
        )
    ))] {
        /// `SO_MEMINFO` (socket(7)): a socket's memory counters, `SK_MEMINFO_DROPS` among
        /// them. libc names the counters' indices but not the option itself on these
        /// architectures (55 in asm-generic/socket.h, which they use).
        mod meminfo {
            use std::os::fd::BorrowedFd;

            use nix::{getsockopt_impl, sockopt_impl};

            const SO_MEMINFO: libc::c_int = 55;

            sockopt_impl!(
                /// A socket's memory counters (`SK_MEMINFO_*`, nine of them since Linux 4.6).
                SockMeminfo,
                GetOnly,
                libc::SOL_SOCKET,
                SO_MEMINFO,
                [u32; 9]
            );

            pub(super) fn drops(fd: BorrowedFd<'_>) -> Option<u64> {
                // nix asserts the kernel filled the whole array; a kernel with fewer counters
                // (before 4.6) would panic it, and that must not take a media worker down.
                let read =
                    std::panic::catch_unwind(move || nix::sys::socket::getsockopt(&fd, SockMeminfo));
                match read {
                    Ok(Ok(m)) => Some(u64::from(m[libc::SK_MEMINFO_DROPS as usize])),
                    _ => None,
                }
            }
        }
    } else {
        /// Where the kernel has no `SO_MEMINFO` we know of: drops are unknown.
        mod meminfo {
            pub(super) fn drops(_: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
                None
            }
        }
    }
}

/// Opens a blocking UDP socket on `addr` with [`SOCKET_BUFFER`]-byte kernel buffers (best
/// effort: the kernel caps them at `net.core.[rw]mem_max`) and "don't fragment" set.
///
/// Don't-fragment (`IP_PMTUDISC_PROBE`: the DF bit on every datagram, sized against the
/// interface's MTU, never against a path MTU learnt from ICMP, which anyone can forge).
/// Media packets are sized to fit any path (RTP ~1,200 bytes, DTLS and SCTP under str0m's
/// MTU), so a fragment is never wanted. It also saves work per datagram: Linux gives an
/// IPv4 datagram without DF an IP ID from a hashed, shared counter (`__ip_select_ident`,
/// 5 % of a worker's core fanning one webinar out to 600 subscribers), and one with DF on
/// an unconnected socket an ID of 0.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    dont_fragment(&sock, addr)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn dont_fragment(sock: &Socket, addr: SocketAddr) -> io::Result<()> {
    let v4 = libc::IP_PMTUDISC_PROBE as usize;
    match addr {
        SocketAddr::V4(_) => nix::sys::socket::setsockopt(sock, IpMtuDiscover, &v4)?,
        SocketAddr::V6(_) => {
            let v6 = libc::IPV6_PMTUDISC_PROBE as usize;
            nix::sys::socket::setsockopt(sock, Ipv6MtuDiscover, &v6)?;
            // A dual-stack socket sends to IPv4-mapped peers through the IPv4 path, which
            // keeps its own mode; an IPv6-only one refuses the option (nothing to set).
            let _ = nix::sys::socket::setsockopt(sock, IpMtuDiscover, &v4);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;

    #[test]
    fn media_sockets_set_dont_fragment() {
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(
            getsockopt(&v4.as_fd(), IpMtuDiscover).unwrap(),
            libc::IP_PMTUDISC_PROBE as usize
        );

        // Where the host has IPv6 on loopback, the IPv6 socket carries it too.
        if let Ok(v6) = bind("[::1]:0".parse().unwrap()) {
            assert_eq!(
                getsockopt(&v6.as_fd(), Ipv6MtuDiscover).unwrap(),
                libc::IPV6_PMTUDISC_PROBE as usize
            );
        }
    }

    #[test]
    fn a_receive_queue_that_overflows_counts_its_drops() {
        let rx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(receive_drops(&rx.as_fd()), Some(0));
        // Nobody reads `rx`: its queue (at most the kernel's rmem_max, doubled) fills and
        // the rest is dropped. 20,000 datagrams of 1,400 bytes are 28 MB, well past it.
        let to = rx.local_addr().unwrap();
        for _ in 0..20_000 {
            let _ = tx.send_to(&[1u8; 1400], to);
        }
        let drops = receive_drops(&rx.as_fd()).unwrap();
        assert!(drops > 0 && drops < 20_000, "{drops}");
    }

    #[test]
    fn datagrams_flow_between_media_sockets() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        a.send_to(&[7u8; 1200], b.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (1200, a.local_addr().unwrap()));
    }
}
