//! Receiving on a generator's client socket, optionally with the kernel's receive time.
//!
//! Added latency is measured from the publisher's send to the generator's read of the
//! datagram (`p50_ms`/`p99_ms`). The generator reads its sockets one at a time from one loop,
//! so that figure also holds its own queueing: a video packet fanned out to 200 subscribers
//! lands on 200 sockets within a millisecond or two and is read one socket after another.
//! With `--socket-times`, `SO_TIMESTAMPNS` makes the kernel stamp each datagram when it is
//! queued on the socket (on loopback, inside the server's `sendmsg`), and the step also
//! reports `p50_socket_ms`/`p99_socket_ms`: latency with the generator's reading taken out.
//! Off by default: it turns on timestamping of every received datagram in the kernel, the
//! server's included, and the two figures differed by little (docs/benchmarks.md).

use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use mio::net::UdpSocket;
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use nix::sys::time::TimeSpec;

static SOCKET_TIMES: AtomicBool = AtomicBool::new(false);
static TIMER_READS: AtomicBool = AtomicBool::new(false);

/// With `--timer-reads`, how long the generator sleeps at most between looks at its sockets.
pub const TIMER_READ_TICK: std::time::Duration = std::time::Duration::from_millis(1);

/// `--timer-reads`: the generator sleeps on a timer (at most [`TIMER_READ_TICK`]) and then
/// collects what arrived with a zero-timeout poll, instead of sleeping in epoll. A datagram
/// delivered to a socket then finds nobody to wake, so the sending core (the server's, on
/// loopback) no longer pays for waking the generator, which a deployment with remote
/// receivers never pays either. Read times then carry up to a tick of the generator's
/// sleep, so it implies `--socket-times` and the step's `p50_ms`/`p99_ms` come from the
/// kernel's stamps.
pub fn set_timer_reads(on: bool) {
    TIMER_READS.store(on, Ordering::Relaxed);
    if on {
        set_socket_times(true);
    }
}

/// Whether `--timer-reads` is on.
pub fn timer_reads() -> bool {
    TIMER_READS.load(Ordering::Relaxed)
}

/// Whether client sockets ask for kernel receive times (`--socket-times`).
pub fn set_socket_times(on: bool) {
    SOCKET_TIMES.store(on, Ordering::Relaxed);
}

/// Asks the kernel to stamp every datagram `sock` receives, if `--socket-times` is on.
pub fn enable(sock: &UdpSocket) -> std::io::Result<()> {
    if !SOCKET_TIMES.load(Ordering::Relaxed) {
        return Ok(());
    }
    stamp(sock)
}

fn stamp(sock: &UdpSocket) -> std::io::Result<()> {
    setsockopt(sock, sockopt::ReceiveTimestampns, &true).map_err(std::io::Error::from)
}

/// Room for the control message [`recv`] expects.
pub fn control_buffer() -> Vec<u8> {
    nix::cmsg_space!(TimeSpec)
}

/// One datagram read from a non-blocking socket.
pub struct Datagram {
    pub len: usize,
    pub source: SocketAddr,
    /// When the kernel queued it on the socket (NTP Q32.32), if asked and it said.
    pub stamped: Option<u64>,
}

/// Reads one datagram into `buf` (None when the socket is empty or the read failed).
pub fn recv(sock: &UdpSocket, buf: &mut [u8], control: &mut [u8]) -> Option<Datagram> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg =
        recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(control), MsgFlags::empty())
            .ok()?;
    let source = msg.address.as_ref().and_then(socket_addr)?;
    let stamped = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::ScmTimestampns(ts) => Some(ntp_of_timespec(ts)),
            _ => None,
        })
    });
    Some(Datagram {
        len: msg.bytes,
        source,
        stamped,
    })
}

impl Datagram {
    /// This datagram's times, read now, for a packet the publisher sent at `sent`.
    pub fn times(&self, sent: u64) -> crate::rtp::Times {
        crate::rtp::Times {
            sent,
            queued: self.stamped,
            read: crate::rtp::ntp_now(),
        }
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::V4(SocketAddrV4::from(*v4)))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
        })
}

/// A kernel receive time (CLOCK_REALTIME) as NTP Q32.32, the clock of abs-capture-time.
fn ntp_of_timespec(ts: TimeSpec) -> u64 {
    let since_epoch = Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec().max(0) as u32);
    crate::rtp::ntp_of(UNIX_EPOCH + since_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_carries_its_source_and_a_kernel_time_between_send_and_read() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let rx = UdpSocket::from_std(rx);
        stamp(&rx).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = crate::rtp::ntp_now();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        let (mut buf, mut control) = (vec![0u8; 64], control_buffer());
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let d = loop {
            if let Some(d) = recv(&rx, &mut buf, &mut control) {
                break d;
            }
            assert!(std::time::Instant::now() < end, "nothing arrived");
            std::thread::sleep(Duration::from_millis(1));
        };
        let after = crate::rtp::ntp_now();
        assert_eq!(&buf[..d.len], b"hello");
        assert_eq!(d.source, tx.local_addr().unwrap());
        let t = d.stamped.expect("kernel stamp");
        assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
        assert!(recv(&rx, &mut buf, &mut control).is_none());
    }
}
