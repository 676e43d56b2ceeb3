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
use std::os::fd::{AsFd, AsRawFd, RawFd};

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
    bufs: Box<[[u8; MAX_DATAGRAM]; BATCH]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// For each datagram of the last read: its buffer, its length and its source.
    got: Vec<(usize, usize, SocketAddr)>,
    /// The last read took fewer datagrams than it had room for: the socket's queue was
    /// empty then.
    drained: bool,
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("BATCH buffers were made")),
            headers: MultiHeaders::preallocate(BATCH, None),
            got: Vec::with_capacity(BATCH),
            drained: false,
        }
    }

    /// Reads what is waiting, up to [`BATCH`] datagrams; `Ok(0)` when nothing is.
    pub fn read(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.got.clear();
        self.drained = false;
        // On the stack: a light-load wake-up reads one datagram or two, and an allocation
        // per read would be one per packet.
        let mut iovs = self.bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
        match recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(msgs) => {
                // Counts every datagram taken, each's buffer index on the way.
                let mut taken = 0;
                for m in msgs {
                    if let Some(from) = m.address.as_ref().and_then(to_std) {
                        self.got.push((taken, m.bytes, from));
                    }
                    taken += 1;
                }
                self.drained = taken < BATCH;
                Ok(self.got.len())
            }
            Err(nix::errno::Errno::EAGAIN) => {
                self.drained = true;
                Ok(0)
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Datagram `i` of the last read and its source.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let (buf, n, from) = self.got[i];
        (&self.bufs[buf][..n], from)
    }

    /// Whether the last read found the socket's queue empty before its buffers were full
    /// (with `MSG_DONTWAIT`, `recvmmsg` stops at the first empty read). Sockets are polled
    /// edge-triggered, and every datagram queued after that read raises a new readiness
    /// event, so the worker can wait without reading again to see `EAGAIN`: one system
    /// call fewer per wake-up at light load, where each wake-up carries a datagram or two.
    pub fn drained(&self) -> bool {
        self.drained
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

impl Written {
    /// The datagram's length in bytes.
    pub fn size(&self) -> usize {
        self.len
    }
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
/// all the same size but the last: such runs become one GSO message (a part per segment),
/// which costs the kernel about one datagram's send path instead of one per packet. Runs
/// and single datagrams go out together, up to `QUEUED` messages per `sendmmsg`, as long as
/// they can share one segment size (in a meeting, every subscriber's video runs can). If
/// the kernel refuses GSO (an old kernel or a device without checksum offload), the outbox
/// says so once and sends datagrams one by one from then on.
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
    /// The same, with room for one `UDP_SEGMENT` control message per datagram.
    gso_headers: MultiHeaders<SockaddrStorage>,
    gso: bool,
    /// A flush's working lists, empty between flushes and kept for their allocations (at
    /// light load a flush carries one packet's copies, and four allocations per flush were
    /// most of a worker's; see [`recast`] for the borrowed ones).
    scratch: Scratch,
}

/// [`Outbox::flush`]'s lists, as empty vectors whose elements borrow nothing.
#[derive(Default)]
struct Scratch {
    iov: Vec<IoSlice<'static>>,
    sends: Vec<&'static Queued>,
    messages: Vec<&'static [IoSlice<'static>]>,
    addrs: Vec<Option<SockaddrStorage>>,
}

/// An empty vector's allocation, for elements of another lifetime: collecting a vector's
/// own iterator into a vector of a type of the same size and alignment reuses its buffer
/// (std's in-place collect), and an empty vector's iterator yields nothing to convert. If a
/// future std stopped reusing it, this would cost an allocation again, nothing more.
fn recast<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector was cleared"))
        .collect()
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
            gso_headers: MultiHeaders::preallocate(QUEUED, Some(gso_cmsg_space())),
            gso: cfg!(target_os = "linux"),
            scratch: Scratch {
                iov: Vec::with_capacity(QUEUED * 4),
                sends: Vec::with_capacity(QUEUED),
                messages: Vec::with_capacity(QUEUED),
                addrs: Vec::with_capacity(QUEUED),
            },
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

    /// Sends everything queued, in queue order: consecutive sends go out together in one
    /// `sendmmsg` while they can share its `UDP_SEGMENT` size (a run must be cut by exactly
    /// that size, a single datagram only fit in one segment, so the kernel sends it as it
    /// is); returns (datagrams sent, dropped). Datagrams the kernel will not take now (full
    /// buffer) are dropped, never retried in a loop. The buffer is kept (datagrams written
    /// and not queued yet stay valid) until [`Outbox::recycle`].
    pub fn flush(&mut self, sockets: &[impl AsFd]) -> (u64, u64) {
        let (mut sent, mut dropped) = (0u64, 0u64);
        if self.queue.is_empty() {
            return (0, 0);
        }
        let queue = std::mem::take(&mut self.queue);
        let scratch = std::mem::take(&mut self.scratch);
        let buf = &self.buf;
        let mut iov: Vec<IoSlice> = recast(scratch.iov);
        iov.extend(
            self.parts
                .iter()
                .map(|&(start, len)| IoSlice::new(&buf[start..start + len])),
        );
        let (mut sends, mut messages, mut addrs): (Vec<&Queued>, Vec<&[IoSlice]>, _) = (
            recast(scratch.sends),
            recast(scratch.messages),
            scratch.addrs,
        );
        let datagrams = |sends: &[&Queued]| sends.iter().map(|q| q.segments as u64).sum::<u64>();
        for (index, socket) in sockets.iter().enumerate() {
            let fd = socket.as_fd().as_raw_fd();
            sends.clear();
            sends.extend(queue.iter().filter(|q| q.socket == index));
            let mut from = 0;
            while from < sends.len() {
                let (len, segment) = Segmenting::batch(&sends[from..], self.gso);
                if len == 0 {
                    // A run, and GSO refused: its datagrams go one by one.
                    let (ok, failed) = send_apart(fd, &mut self.headers, &iov, sends[from]);
                    (sent, dropped) = (sent + ok, dropped + failed);
                    from += 1;
                    continue;
                }
                let batch = &sends[from..from + len];
                messages.clear();
                messages.extend(batch.iter().map(|q| &iov[q.first..q.first + q.segments]));
                addrs.clear();
                addrs.extend(batch.iter().map(|q| Some(SockaddrStorage::from(q.to))));
                let mut at = 0;
                while at < batch.len() {
                    let headers = match segment {
                        None => &mut self.headers,
                        Some(_) => &mut self.gso_headers,
                    };
                    let result = send_many(fd, headers, &messages[at..], &addrs[at..], segment);
                    match result {
                        Ok(done) => {
                            sent += datagrams(&batch[at..at + done]);
                            at += done;
                            // The kernel stopped at this message and keeps its error to
                            // itself (`sendmmsg` reports only how many it took). It is
                            // dropped, not sent again: a datagram a filter refused must
                            // stay refused (retried, one got through, and Chromium saw no
                            // loss for a quarter of what nftables dropped). A full buffer
                            // shows on the next call, which stops at once.
                            if let Some(q) = batch.get(at) {
                                dropped += q.segments as u64;
                                at += 1;
                            }
                        }
                        // The socket's buffer is full: the rest would fail the same way.
                        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => {
                            dropped += datagrams(&batch[at..]);
                            at = batch.len();
                        }
                        // What a kernel or device without UDP GSO answers, unless the
                        // destination itself is refused: the same send without GSO says.
                        Err(
                            e @ (nix::errno::Errno::EIO
                            | nix::errno::Errno::EINVAL
                            | nix::errno::Errno::EOPNOTSUPP
                            | nix::errno::Errno::ENOPROTOOPT),
                        ) if segment.is_some() => {
                            let q = batch[at];
                            at += 1;
                            let (ok, failed) = send_apart(fd, &mut self.headers, &iov, q);
                            (sent, dropped) = (sent + ok, dropped + failed);
                            if ok > 0 {
                                tracing::warn!(
                                    "UDP GSO refused ({e}); sending datagrams one by one"
                                );
                                // The rest is planned again, without GSO.
                                self.gso = false;
                                break;
                            }
                        }
                        // This destination is refused (unreachable, filtered): only its
                        // datagrams are dropped, the others go on.
                        Err(_) => {
                            dropped += batch[at].segments as u64;
                            at += 1;
                        }
                    }
                }
                from += at;
            }
        }
        let (messages, sends) = (recast(messages), recast(sends));
        self.scratch = Scratch {
            iov: recast(iov),
            sends,
            messages,
            addrs,
        };
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

/// Room for one `UDP_SEGMENT` control message.
fn gso_cmsg_space() -> Vec<u8> {
    Vec::with_capacity(nix::sys::socket::cmsg_space::<u16>())
}

/// What the sends of one `sendmmsg` share: no control message (single datagrams only; the
/// longest so far), or one `UDP_SEGMENT` size that cuts every run in it and that every
/// single datagram in it fits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segmenting {
    Free(usize),
    Fixed(usize),
}

impl Segmenting {
    /// How many of `sends` (at most [`QUEUED`]) go out in one `sendmmsg` from the first on,
    /// and the `UDP_SEGMENT` size they share, if any. Without `gso` a run goes in none
    /// (0 when the first is one: it must go apart).
    fn batch(sends: &[&Queued], gso: bool) -> (usize, Option<usize>) {
        let mut shared = Segmenting::Free(0);
        let mut len = 0;
        for q in sends.iter().take(QUEUED) {
            if !gso && q.segments > 1 {
                break;
            }
            match shared.with(q) {
                Some(s) => shared = s,
                None => break,
            }
            len += 1;
        }
        match shared {
            Segmenting::Free(_) => (len, None),
            Segmenting::Fixed(segment) => (len, Some(segment)),
        }
    }

    /// What the batch shares once `q` joins it, if it can.
    fn with(self, q: &Queued) -> Option<Segmenting> {
        let run = q.segments > 1;
        match self {
            Segmenting::Free(longest) if !run => Some(Segmenting::Free(longest.max(q.segment))),
            Segmenting::Free(longest) => {
                (longest <= q.segment).then_some(Segmenting::Fixed(q.segment))
            }
            Segmenting::Fixed(size) if !run => (q.segment <= size).then_some(self),
            Segmenting::Fixed(size) => (q.segment == size).then_some(self),
        }
    }
}

/// Sends a queued send's datagrams one by one, without GSO; (sent, dropped).
fn send_apart(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    iov: &[IoSlice],
    q: &Queued,
) -> (u64, u64) {
    let to = [Some(SockaddrStorage::from(q.to))];
    let mut sent = 0;
    for part in &iov[q.first..q.first + q.segments] {
        let one = [std::slice::from_ref(part)];
        if let Ok(1) = send_many(fd, headers, &one, &to, None) {
            sent += 1;
        }
    }
    (sent, q.segments as u64 - sent)
}

/// One `sendmmsg` of `messages` (a message's parts leave as one datagram, or as one per
/// `segment` bytes with UDP GSO); how many messages the kernel took.
fn send_many(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    messages: &[&[IoSlice]],
    addrs: &[Option<SockaddrStorage>],
    segment: Option<usize>,
) -> nix::Result<usize> {
    let flags = MsgFlags::MSG_DONTWAIT;
    match segment {
        None => sendmmsg(fd, headers, messages.iter(), addrs, [], flags).map(Iterator::count),
        // `UDP_SEGMENT` as every message's control message (Linux only).
        #[cfg(target_os = "linux")]
        Some(segment) => {
            let segment = u16::try_from(segment).map_err(|_| nix::errno::Errno::EINVAL)?;
            let cmsgs = [nix::sys::socket::ControlMessage::UdpGsoSegments(&segment)];
            sendmmsg(fd, headers, messages.iter(), addrs, cmsgs, flags).map(Iterator::count)
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => Err(nix::errno::Errno::EOPNOTSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recast_vector_keeps_its_allocation() {
        let mut v: Vec<&'static [u8]> = Vec::with_capacity(64);
        v.push(b"x");
        let ptr = v.as_ptr() as usize;
        let local = [0u8; 4];
        let mut w: Vec<&[u8]> = recast(v);
        assert!(w.is_empty());
        assert_eq!((w.capacity(), w.as_ptr() as usize), (64, ptr));
        w.push(&local);
        let back: Vec<&'static [u8]> = recast(w);
        assert_eq!((back.capacity(), back.as_ptr() as usize), (64, ptr));
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in() {
        let [a, b] = loopback();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        for i in 0..(BATCH + 5) {
            out.push(0, to, &vec![i as u8; 10 + i]);
        }
        let (sent, dropped) = out.flush(&[&a]);
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
    fn a_read_that_leaves_room_says_the_queue_was_empty_and_a_full_one_does_not() {
        let [a, b] = loopback();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        // On loopback a datagram is in the receiver's queue when the send returns.
        for i in 0..(BATCH + 3) {
            out.push(0, to, &[i as u8; 20]);
        }
        assert_eq!(out.flush(&[&a]), ((BATCH + 3) as u64, 0));
        let mut inbox = Inbox::new();
        assert_eq!(inbox.read(&b).unwrap(), BATCH);
        assert!(
            !inbox.drained(),
            "a full batch may have left datagrams behind"
        );
        assert_eq!(inbox.read(&b).unwrap(), 3);
        assert!(inbox.drained(), "three of {BATCH}: the queue ran dry");
        for i in 0..3 {
            assert_eq!(inbox.datagram(i).0, &[(BATCH + i) as u8; 20]);
        }
        assert_eq!(inbox.read(&b).unwrap(), 0);
        assert!(inbox.drained());
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
        let (sent, dropped) = out.flush(&[&a]);
        assert_eq!((sent, dropped), (10, 0));
        #[cfg(target_os = "linux")]
        assert!(out.gso, "the kernel took the GSO sends");
        assert_eq!(recv_all(&b, sent_b.len()), sent_b);
        assert_eq!(recv_all(&c, 1), vec![vec![9u8; 30]]);
    }

    #[test]
    fn runs_of_one_segment_size_and_the_singles_that_fit_share_a_sendmmsg() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let send = |segment: usize, segments: usize| Queued {
            socket: 0,
            to,
            first: 0,
            segment,
            segments,
            open: false,
        };
        let free = Segmenting::Free(0);
        // Singles alone need no control message.
        let singles = free.with(&send(100, 1)).unwrap().with(&send(300, 1));
        assert_eq!(singles, Some(Segmenting::Free(300)));
        // A run fixes the size, if the singles before it fit in one segment.
        assert_eq!(
            singles.unwrap().with(&send(1100, 4)),
            Some(Segmenting::Fixed(1100))
        );
        assert_eq!(singles.unwrap().with(&send(200, 4)), None);
        // After it: runs of that size, and singles no longer than it.
        let fixed = Segmenting::Fixed(1100);
        assert_eq!(fixed.with(&send(1100, 7)), Some(fixed));
        assert_eq!(fixed.with(&send(90, 1)), Some(fixed));
        assert_eq!(fixed.with(&send(1100, 1)), Some(fixed));
        assert_eq!(fixed.with(&send(1101, 1)), None);
        assert_eq!(fixed.with(&send(1000, 3)), None);

        // The batch plan: with GSO, all four share one size; without it (refused), the
        // singles before the run still share a sendmmsg, and the run goes apart (0).
        let (a, b, run, c) = (send(100, 1), send(200, 1), send(1100, 3), send(90, 1));
        let sends = [&a, &b, &run, &c];
        assert_eq!(Segmenting::batch(&sends, true), (4, Some(1100)));
        assert_eq!(Segmenting::batch(&sends, false), (2, None));
        assert_eq!(Segmenting::batch(&sends[2..], false), (0, None));
        assert_eq!(Segmenting::batch(&sends[3..], false), (1, None));
    }

    #[test]
    fn runs_queued_before_gso_was_refused_leave_datagram_by_datagram_in_order() {
        let [a, b] = loopback();
        let to = b.local_addr().unwrap();
        let mut out = Outbox::new();
        let mut want = vec![vec![1u8; 60]];
        want.extend((0..3u8).map(|k| vec![10 + k; 500]));
        want.push(vec![2u8; 80]);
        for d in &want {
            out.push(0, to, d);
        }
        // As after a refusal earlier in the flush: runs already queued must go apart.
        out.gso = false;
        assert_eq!(out.flush(&[&a]), (5, 0));
        assert_eq!(recv_all(&b, 5), want);
    }

    #[test]
    fn subscribers_runs_and_singles_in_one_flush_arrive_whole_and_in_order() {
        let [a, b, c] = loopback();
        let mut out = Outbox::new();
        let mut want = [Vec::new(), Vec::new()];
        // As in a meeting: each subscriber gets an audio packet, then video frames of two
        // publishers cut at one size (each frame's last packet shorter), then audio again.
        for (i, sock) in [&b, &c].into_iter().enumerate() {
            let to = sock.local_addr().unwrap();
            let mut datagrams = vec![vec![1u8 + i as u8; 90]];
            for frame in 0..2u8 {
                datagrams.extend((0..3u8).map(|k| vec![10 * frame + k; 1100]));
                datagrams.push(vec![50 + frame; 700]);
            }
            datagrams.push(vec![9; 120]);
            for d in &datagrams {
                out.push(0, to, d);
            }
            want[i] = datagrams;
        }
        assert_eq!(out.flush(&[&a]), (20, 0));
        assert_eq!(recv_all(&b, 10), want[0]);
        assert_eq!(recv_all(&c, 10), want[1]);
    }

    #[test]
    fn a_refused_destination_loses_only_its_own_datagrams_and_gso_stays_on() {
        let [a, b, c] = loopback();
        let mut out = Outbox::new();
        // Port 0: the kernel refuses the destination (EINVAL, as it refuses GSO).
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let run = |out: &mut Outbox, to: SocketAddr, byte: u8| {
            (0..3).for_each(|_| out.push(0, to, &[byte; 100]));
        };
        run(&mut out, b.local_addr().unwrap(), 1);
        out.push(0, refused, &[2; 50]);
        run(&mut out, refused, 3);
        run(&mut out, c.local_addr().unwrap(), 4);
        assert_eq!(out.flush(&[&a]), (6, 4));
        assert!(out.gso || cfg!(not(target_os = "linux")));
        assert_eq!(recv_all(&b, 3), vec![vec![1u8; 100]; 3]);
        assert_eq!(recv_all(&c, 3), vec![vec![4u8; 100]; 3]);
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
        assert_eq!(out.flush(&[&a]), (9, 0));
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
        assert_eq!(out.flush(&[&a]), (1, 0));
        assert!(out.queue(0, to, first));
        assert_eq!(out.flush(&[&a]), (1, 0));
        assert_eq!(recv_all(&b, 2), vec![vec![2u8; 10], vec![1u8; 20]]);
        // After the buffer is reused, an old one is refused, never sent as other bytes.
        let stale = out.write(w(3)).unwrap();
        out.recycle();
        let fresh = out.write(w(4)).unwrap();
        assert!(!out.queue(0, to, stale));
        assert!(out.queue(0, to, fresh));
        assert_eq!(out.flush(&[&a]), (1, 0));
        assert_eq!(recv_all(&b, 1), vec![vec![4u8; 20]]);
        // Trimming an empty buffer keeps at least the minimum.
        out.recycle();
        out.trim();
        assert!(out.buf.capacity() >= MIN_BUFFER);
    }
}
