//! Batched UDP I/O for a media worker: `recvmmsg` and `sendmmsg` through nix's safe
//! wrappers, so one system call moves up to [`BATCH`] datagrams.
//!
//! The worker queues every datagram str0m produces while it handles a batch of input and
//! flushes the queue once per batch (and whenever it fills up), so fan-out to many
//! subscribers costs one syscall per [`BATCH`] datagrams instead of one each.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
const MAX_DATAGRAM: usize = 2048;

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Receive buffers for one `recvmmsg`.
pub(crate) struct Inbox {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    headers: MultiHeaders<SockaddrStorage>,
    got: Vec<(usize, SocketAddr)>,
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH],
            headers: MultiHeaders::preallocate(BATCH, None),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what is waiting, up to [`BATCH`] datagrams; `Ok(0)` when nothing is.
    pub fn read(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.got.clear();
        let mut iovs: Vec<[IoSliceMut; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        match recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(msgs) => {
                for m in msgs {
                    if let Some(from) = m.address.as_ref().and_then(to_std) {
                        self.got.push((m.bytes, from));
                    }
                }
                Ok(self.got.len())
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Datagram `i` of the last read and its source.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let (n, from) = self.got[i];
        (&self.bufs[i][..n], from)
    }
}

/// Segments one UDP GSO send may carry (the kernel allows 64).
const MAX_SEGMENTS: usize = 32;
/// Bytes one UDP GSO send may carry (under the 64 KiB datagram limit, headers included).
const MAX_GSO_BYTES: usize = 60_000;

/// One queued send: a datagram, or a run of equal-sized datagrams to one destination that
/// the kernel splits (UDP GSO, `UDP_SEGMENT`); only a run's last segment may be shorter.
struct Queued {
    socket: usize,
    to: SocketAddr,
    data: Vec<u8>,
    /// Segment size: the first datagram's length.
    segment: usize,
    segments: usize,
    /// False once a shorter segment ended the run.
    open: bool,
}

/// Datagrams waiting to be sent, per socket index.
///
/// A subscriber's packets leave back to back (str0m releases what was written to it in one
/// drain), all to one address and, for a video frame, all the same size but the last: such
/// runs become one GSO send, which costs the kernel about one datagram's send path instead
/// of one per packet. If the kernel refuses GSO (an old kernel or a device without
/// checksum offload), the outbox says so once and sends datagrams one by one from then on.
pub(crate) struct Outbox {
    queue: Vec<Queued>,
    headers: MultiHeaders<SockaddrStorage>,
    gso: bool,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            queue: Vec::with_capacity(BATCH),
            headers: MultiHeaders::preallocate(BATCH, None),
            gso: cfg!(target_os = "linux"),
        }
    }

    pub fn push(&mut self, socket: usize, to: SocketAddr, data: Vec<u8>) {
        if self.gso {
            if let Some(last) = self.queue.last_mut() {
                let joins = last.open
                    && last.socket == socket
                    && last.to == to
                    && last.segments < MAX_SEGMENTS
                    && data.len() <= last.segment
                    && !data.is_empty()
                    && last.data.len() + data.len() <= MAX_GSO_BYTES;
                if joins {
                    last.data.extend_from_slice(&data);
                    last.segments += 1;
                    last.open = data.len() == last.segment;
                    return;
                }
            }
        }
        self.queue.push(Queued {
            socket,
            to,
            segment: data.len(),
            segments: 1,
            open: true,
            data,
        });
    }

    pub fn is_full(&self) -> bool {
        self.queue.len() >= BATCH
    }

    /// Sends everything queued, in order per socket: single datagrams with `sendmmsg`, runs
    /// with one GSO `sendmsg` each; returns (datagrams sent, dropped). Datagrams the kernel
    /// will not take now (full buffer) are dropped, never retried in a loop.
    pub fn flush(&mut self, sockets: &[RawFd]) -> (u64, u64) {
        let (mut sent, mut dropped) = (0u64, 0u64);
        if self.queue.is_empty() {
            return (0, 0);
        }
        let queue = std::mem::take(&mut self.queue);
        for (index, fd) in sockets.iter().enumerate() {
            let mut singles: Vec<(&[u8], SocketAddr)> = Vec::new();
            for q in queue.iter().filter(|q| q.socket == index) {
                if q.segments == 1 {
                    singles.push((&q.data, q.to));
                    continue;
                }
                // Keep this destination's order: what was queued before the run goes first.
                self.send_singles(*fd, &mut singles, &mut sent, &mut dropped);
                match send_gso(*fd, q) {
                    Ok(()) => sent += q.segments as u64,
                    // What a kernel or device without UDP GSO answers.
                    Err(
                        e @ (nix::errno::Errno::EIO
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::ENOPROTOOPT),
                    ) => {
                        if self.gso {
                            tracing::warn!("UDP GSO refused ({e}); sending datagrams one by one");
                            self.gso = false;
                        }
                        singles.extend(q.data.chunks(q.segment).map(|c| (c, q.to)));
                    }
                    // A full buffer or an unreachable destination: dropped, as a single
                    // datagram would be.
                    Err(_) => dropped += q.segments as u64,
                }
            }
            self.send_singles(*fd, &mut singles, &mut sent, &mut dropped);
        }
        let mut queue = queue;
        queue.clear();
        self.queue = queue;
        (sent, dropped)
    }

    fn send_singles(
        &mut self,
        fd: RawFd,
        singles: &mut Vec<(&[u8], SocketAddr)>,
        sent: &mut u64,
        dropped: &mut u64,
    ) {
        for chunk in singles.chunks(BATCH) {
            let slices: Vec<[IoSlice; 1]> = chunk.iter().map(|(d, _)| [IoSlice::new(d)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = chunk
                .iter()
                .map(|(_, to)| Some(SockaddrStorage::from(*to)))
                .collect();
            match sendmmsg(
                fd,
                &mut self.headers,
                slices.iter(),
                &addrs,
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(done) => {
                    let n = done.count() as u64;
                    *sent += n;
                    *dropped += chunk.len() as u64 - n;
                }
                Err(_) => *dropped += chunk.len() as u64,
            }
        }
        singles.clear();
    }
}

/// One GSO send of a run (Linux: `UDP_SEGMENT` as a control message).
#[cfg(target_os = "linux")]
fn send_gso(fd: RawFd, q: &Queued) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let segment = u16::try_from(q.segment).map_err(|_| nix::errno::Errno::EINVAL)?;
    let to = SockaddrStorage::from(q.to);
    sendmsg(
        fd,
        &[IoSlice::new(&q.data)],
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::MSG_DONTWAIT,
        Some(&to),
    )
    .map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_gso(_fd: RawFd, _q: &Queued) -> nix::Result<()> {
    Err(nix::errno::Errno::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_in() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        for i in 0..(BATCH + 5) {
            out.push(0, to, vec![i as u8; 10 + i]);
        }
        let (sent, dropped) = out.flush(&[a.as_raw_fd()]);
        assert_eq!((sent, dropped), ((BATCH + 5) as u64, 0));
        let mut inbox = Inbox::new();
        let mut seen = Vec::new();
        for _ in 0..100 {
            let n = inbox.read(&b).unwrap();
            for i in 0..n {
                let (d, from) = inbox.datagram(i);
                assert_eq!(from, a.local_addr().unwrap());
                seen.push(d.len());
            }
            if seen.len() == BATCH + 5 {
                break;
            }
        }
        assert_eq!(seen, (0..BATCH + 5).map(|i| 10 + i).collect::<Vec<_>>());
        assert_eq!(inbox.read(&b).unwrap(), 0, "nothing left: no blocking");
    }

    #[test]
    fn equal_sized_runs_to_one_destination_arrive_as_separate_datagrams_in_order() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut out = Outbox::new();
        // A "frame" of five equal packets and a shorter last one, then another frame that
        // must not join the closed run, with a datagram to someone else in between.
        let mut sent_b = Vec::new();
        for k in 0..5u8 {
            sent_b.push(vec![k; 100]);
        }
        sent_b.push(vec![5; 60]);
        for d in &sent_b {
            out.push(0, to_b, d.clone());
        }
        out.push(0, to_c, vec![9; 30]);
        for k in 6..9u8 {
            out.push(0, to_b, vec![k; 100]);
            sent_b.push(vec![k; 100]);
        }
        if out.gso {
            assert_eq!(out.queue.len(), 3, "two runs and a single");
            assert_eq!(out.queue[0].segments, 6);
            assert!(!out.queue[0].open);
        }
        let (sent, dropped) = out.flush(&[a.as_raw_fd()]);
        assert_eq!((sent, dropped), (10, 0));
        #[cfg(target_os = "linux")]
        assert!(out.gso, "the kernel took the GSO sends");
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for want in &sent_b {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &want[..]);
        }
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(c.recv(&mut buf).unwrap(), 30);
    }
}
