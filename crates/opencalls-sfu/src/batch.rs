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

/// Datagrams waiting to be sent, per socket index.
pub(crate) struct Outbox {
    queue: Vec<(usize, SocketAddr, Vec<u8>)>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            queue: Vec::with_capacity(BATCH),
            headers: MultiHeaders::preallocate(BATCH, None),
        }
    }

    pub fn push(&mut self, socket: usize, to: SocketAddr, data: Vec<u8>) {
        self.queue.push((socket, to, data));
    }

    pub fn is_full(&self) -> bool {
        self.queue.len() >= BATCH
    }

    /// Sends everything queued with `sendmmsg`; returns (sent, dropped). Datagrams the
    /// kernel will not take now (full buffer) are dropped, never retried in a loop.
    pub fn flush(&mut self, sockets: &[RawFd]) -> (u64, u64) {
        let (mut sent, mut dropped) = (0u64, 0u64);
        if self.queue.is_empty() {
            return (0, 0);
        }
        let queue = std::mem::take(&mut self.queue);
        for (index, fd) in sockets.iter().enumerate() {
            let mine: Vec<&(usize, SocketAddr, Vec<u8>)> =
                queue.iter().filter(|(s, _, _)| *s == index).collect();
            for chunk in mine.chunks(BATCH) {
                let slices: Vec<[IoSlice; 1]> =
                    chunk.iter().map(|(_, _, d)| [IoSlice::new(d)]).collect();
                let addrs: Vec<Option<SockaddrStorage>> = chunk
                    .iter()
                    .map(|(_, to, _)| Some(SockaddrStorage::from(*to)))
                    .collect();
                match sendmmsg(
                    *fd,
                    &mut self.headers,
                    slices.iter(),
                    &addrs,
                    [],
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(done) => {
                        let n = done.count() as u64;
                        sent += n;
                        dropped += chunk.len() as u64 - n;
                    }
                    Err(_) => dropped += chunk.len() as u64,
                }
            }
        }
        let mut queue = queue;
        queue.clear();
        self.queue = queue;
        (sent, dropped)
    }
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
}
