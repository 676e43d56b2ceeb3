//! Batched UDP I/O for a media worker: `recvmmsg` and `sendmmsg` through nix's safe
//! wrappers, so one system call moves up to [`BATCH`] datagrams in and up to `QUEUED` out.
//!
//! The worker queues every datagram it produces while it handles a batch of input and
//! flushes the queue once per batch (and whenever it fills up), so fan-out to many
//! subscribers costs a few syscalls per batch instead of one per datagram. Datagrams are
//! written once, into the outbox's own buffer (packets sealed beside str0m are sealed in
//! place there), and sent from it.

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
/// Queued sends (single datagrams or GSO runs) that fill the outbox, and the datagrams one
/// `sendmmsg` carries: as the raw relay of the benchmark.
const QUEUED: usize = 64;
/// What the outbox's buffer keeps of its capacity when trimmed, at least.
const MIN_BUFFER: usize = 256 * 1024;

/// A datagram written into the outbox's buffer and not queued yet (a packet sealed for a
/// session that is sent when the session's turn comes): where its bytes are, and which
/// use of the buffer they belong to (the buffer is reused after every worker flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    start: usize,
    len: usize,
    generation: u32,
}

/// One queued send: a datagram, or a run of datagrams to one destination that the kernel
/// splits (UDP GSO, `UDP_SEGMENT`), all of the first one's size but the last, which may be
/// shorter. Its datagrams are `Outbox::parts[first..first + segments]`.
struct Queued {
    socket: usize,
    to: SocketAddr,
    first: usize,
    /// Segment size: the first datagram's length.
    segment: usize,
    segments: usize,
    /// False once a shorter segment ended the run (while open, every segment is `segment`
    /// bytes long).
    open: bool,
}

/// Datagrams waiting to be sent, per socket index.
///
/// Every datagram's bytes are written once, into one buffer the outbox owns: packets sealed
/// beside str0m are sealed in place there (no buffer per packet, no copy into a send
/// buffer), str0m's datagrams are copied in. A send is a list of parts of that buffer.
/// A subscriber's packets leave back to back, all to one address and, for a video frame,
/// all the same size but the last: such runs become one GSO send (one `sendmsg` with a part
/// per segment), which costs the kernel about one datagram's send path instead of one per
/// packet. If the kernel refuses GSO (an old kernel or a device without checksum offload),
/// the outbox says so once and sends datagrams one by one from then on.
pub(crate) struct Outbox {
    buf: Vec<u8>,
    /// Bumped whenever `buf` is reused; a `Written` of another generation is stale.
    generation: u32,
    /// The most `buf` held since the last trim.
    high: usize,
    /// Queued datagrams (start, length) in `buf`, in queue order.
    parts: Vec<(usize, usize)>,
    queue: Vec<Queued>,
    headers: MultiHeaders<SockaddrStorage>,
    gso: bool,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            buf: Vec::with_capacity(MIN_BUFFER),
            generation: 0,
            high: 0,
            parts: Vec::with_capacity(QUEUED * 4),
            queue: Vec::with_capacity(QUEUED),
            headers: MultiHeaders::preallocate(QUEUED, None),
            gso: cfg!(target_os = "linux"),
        }
    }

    /// Writes one datagram into the buffer, not queued yet: `write` appends its bytes and
    /// says whether it made one (if not, whatever it appended is dropped).
    pub fn write(&mut self, write: impl FnOnce(&mut Vec<u8>) -> bool) -> Option<Written> {
        let start = self.buf.len();
        if !write(&mut self.buf) || self.buf.len() == start {
            self.buf.truncate(start);
            return None;
        }
        Some(Written {
            start,
            len: self.buf.len() - start,
            generation: self.generation,
        })
    }

    /// Queues a written datagram to `to`; false (nothing queued) if it is stale: written
    /// before the buffer was last reused.
    pub fn queue(&mut self, socket: usize, to: SocketAddr, datagram: Written) -> bool {
        if datagram.generation != self.generation {
            return false;
        }
        let len = datagram.len;
        self.parts.push((datagram.start, len));
        if self.gso {
            if let Some(last) = self.queue.last_mut() {
                let joins = last.open
                    && last.socket == socket
                    && last.to == to
                    && last.segments < MAX_SEGMENTS
                    && len <= last.segment
                    && last.segment * last.segments + len <= MAX_GSO_BYTES;
                if joins {
                    last.segments += 1;
                    last.open = len == last.segment;
                    return true;
                }
            }
        }
        self.queue.push(Queued {
            socket,
            to,
            first: self.parts.len() - 1,
            segment: len,
            segments: 1,
            open: true,
        });
        true
    }

    /// Writes and queues a copy of `data`.
    pub fn push(&mut self, socket: usize, to: SocketAddr, data: &[u8]) {
        if let Some(w) = self.write(|buf| {
            buf.extend_from_slice(data);
            true
        }) {
            self.queue(socket, to, w);
        }
    }

    pub fn is_full(&self) -> bool {
        self.queue.len() >= QUEUED
    }

    /// Sends everything queued, in order per destination: single datagrams with
    /// `sendmmsg`, runs with one GSO `sendmsg` each; returns (datagrams sent, dropped).
    /// Datagrams the kernel will not take now (full buffer) are dropped, never retried in
    /// a loop. The buffer is kept (datagrams written and not queued yet stay valid) until
    /// [`Outbox::recycle`].
    pub fn flush(&mut self, sockets: &[RawFd]) -> (u64, u64) {
        let (mut sent, mut dropped) = (0u64, 0u64);
        if self.queue.is_empty() {
            return (0, 0);
        }
        let queue = std::mem::take(&mut self.queue);
        let buf = &self.buf;
        let datagram = |(start, len): (usize, usize)| &buf[start..start + len];
        for (index, fd) in sockets.iter().enumerate() {
            let mut singles: Vec<(&[u8], SocketAddr)> = Vec::new();
            for q in queue.iter().filter(|q| q.socket == index) {
                let parts = &self.parts[q.first..q.first + q.segments];
                if q.segments == 1 {
                    singles.push((datagram(parts[0]), q.to));
                    continue;
                }
                // Keep this destination's order: what was queued for it before the run goes
                // first (singles to others may follow the run).
                if singles.iter().any(|(_, to)| *to == q.to) {
                    send_singles(
                        *fd,
                        &mut self.headers,
                        &mut singles,
                        &mut sent,
                        &mut dropped,
                    );
                }
                let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS];
                for (slot, part) in iov.iter_mut().zip(parts) {
                    *slot = IoSlice::new(datagram(*part));
                }
                match send_gso(*fd, &iov[..q.segments], q.segment, q.to) {
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
                        singles.extend(parts.iter().map(|p| (datagram(*p), q.to)));
                    }
                    // A full buffer or an unreachable destination: dropped, as a single
                    // datagram would be.
                    Err(_) => dropped += q.segments as u64,
                }
            }
            send_singles(
                *fd,
                &mut self.headers,
                &mut singles,
                &mut sent,
                &mut dropped,
            );
        }
        let mut queue = queue;
        queue.clear();
        self.queue = queue;
        self.parts.clear();
        (sent, dropped)
    }

    /// Reuses the buffer from the start: every datagram written so far is forgotten and can
    /// no longer be queued. Call it only when nothing is queued and nobody holds a
    /// `Written` they still mean to send (the worker: at the end of its flush).
    pub fn recycle(&mut self) {
        if !self.queue.is_empty() {
            debug_assert!(false, "recycle with datagrams queued");
            return;
        }
        self.high = self.high.max(self.buf.len());
        self.buf.clear();
        self.generation = self.generation.wrapping_add(1);
    }

    /// Gives back the buffer's capacity beyond the most it held since the last trim (after
    /// a burst of fan-out), when it is empty.
    pub fn trim(&mut self) {
        if self.buf.is_empty() {
            self.buf.shrink_to(self.high.max(MIN_BUFFER));
            self.high = 0;
        }
    }
}

/// Sends `singles` with `sendmmsg`, [`QUEUED`] per call, and empties it.
fn send_singles(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    singles: &mut Vec<(&[u8], SocketAddr)>,
    sent: &mut u64,
    dropped: &mut u64,
) {
    for chunk in singles.chunks(QUEUED) {
        let slices: Vec<[IoSlice; 1]> = chunk.iter().map(|(d, _)| [IoSlice::new(d)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = chunk
            .iter()
            .map(|(_, to)| Some(SockaddrStorage::from(*to)))
            .collect();
        match sendmmsg(
            fd,
            headers,
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

/// One GSO send of a run, a part per segment (Linux: `UDP_SEGMENT` as a control message).
#[cfg(target_os = "linux")]
fn send_gso(fd: RawFd, parts: &[IoSlice], segment: usize, to: SocketAddr) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let segment = u16::try_from(segment).map_err(|_| nix::errno::Errno::EINVAL)?;
    let to = SockaddrStorage::from(to);
    sendmsg(
        fd,
        parts,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::MSG_DONTWAIT,
        Some(&to),
    )
    .map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_gso(_fd: RawFd, _parts: &[IoSlice], _segment: usize, _to: SocketAddr) -> nix::Result<()> {
    Err(nix::errno::Errno::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_in() {
        let [a, b] = loopback();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        for i in 0..(BATCH + 5) {
            out.push(0, to, &vec![i as u8; 10 + i]);
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
        let [a, b, c] = loopback();
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
            out.push(0, to_b, d);
        }
        out.push(0, to_c, &[9; 30]);
        for k in 6..9u8 {
            out.push(0, to_b, &[k; 100]);
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
        assert_eq!(recv_all(&b, sent_b.len()), sent_b);
        assert_eq!(recv_all(&c, 1), vec![vec![9u8; 30]]);
    }

    /// `N` sockets bound to loopback ports the OS picks.
    fn loopback<const N: usize>() -> [std::net::UdpSocket; N] {
        std::array::from_fn(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    fn recv_all(sock: &std::net::UdpSocket, n: usize) -> Vec<Vec<u8>> {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = sock.recv(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    #[test]
    fn datagrams_written_apart_leave_as_one_run_after_others_queued_for_their_destination() {
        let [a, b, c] = loopback();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut out = Outbox::new();
        // Sealed session by session, as the worker does: b's and c's packets alternate in
        // the buffer, each session's are queued together later.
        let write = |out: &mut Outbox, byte: u8, len: usize| {
            out.write(|buf| {
                buf.extend(std::iter::repeat_n(byte, len));
                true
            })
            .unwrap()
        };
        let mut for_b = Vec::new();
        let mut for_c = Vec::new();
        for k in 0..4u8 {
            for_b.push(write(&mut out, k, 100));
            for_c.push(write(&mut out, 10 + k, 80));
        }
        // Nothing written: nothing kept.
        assert_eq!(
            out.write(|buf| {
                buf.push(1);
                false
            }),
            None
        );
        assert_eq!(out.write(|_| true), None);
        // A single to b first, then c's run, then b's run: b gets its single first.
        out.push(0, to_b, &[99; 30]);
        for w in &for_c {
            assert!(out.queue(0, to_c, *w));
        }
        for w in &for_b {
            assert!(out.queue(0, to_b, *w));
        }
        if out.gso {
            assert_eq!(out.queue.len(), 3, "a single and two runs");
        }
        assert_eq!(out.flush(&[a.as_raw_fd()]), (9, 0));
        let mut want_b = vec![vec![99u8; 30]];
        want_b.extend((0..4u8).map(|k| vec![k; 100]));
        assert_eq!(recv_all(&b, 5), want_b);
        assert_eq!(
            recv_all(&c, 4),
            (0..4u8).map(|k| vec![10 + k; 80]).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_written_datagram_outlives_a_flush_but_not_the_buffers_reuse() {
        let [a, b] = loopback();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        let w = |byte: u8| {
            move |buf: &mut Vec<u8>| {
                buf.extend_from_slice(&[byte; 20]);
                true
            }
        };
        let first = out.write(w(1)).unwrap();
        // Something else fills the outbox and is flushed meanwhile (as when it is full).
        out.push(0, to, &[2; 10]);
        assert_eq!(out.flush(&[a.as_raw_fd()]), (1, 0));
        assert!(out.queue(0, to, first));
        assert_eq!(out.flush(&[a.as_raw_fd()]), (1, 0));
        assert_eq!(recv_all(&b, 2), vec![vec![2u8; 10], vec![1u8; 20]]);
        // After the buffer is reused, an old one is refused, never sent as other bytes.
        let stale = out.write(w(3)).unwrap();
        out.recycle();
        let fresh = out.write(w(4)).unwrap();
        assert!(!out.queue(0, to, stale));
        assert!(out.queue(0, to, fresh));
        assert_eq!(out.flush(&[a.as_raw_fd()]), (1, 0));
        assert_eq!(recv_all(&b, 1), vec![vec![4u8; 20]]);
        // Trimming an empty buffer keeps at least the minimum.
        out.recycle();
        out.trim();
        assert!(out.buf.capacity() >= MIN_BUFFER);
    }
}
