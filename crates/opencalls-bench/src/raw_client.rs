//! Clients of the raw relay: plaintext datagrams of the same sizes the SFU carries
//! (RTP header + payload + SRTP tag), with a sequence number and the send time inside.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::UdpSocket;

use crate::rtp::{self, Meter};

/// RTP header (12) + one-byte extension block with abs-capture-time (16) + SRTP tag (10).
const OVERHEAD: usize = 38;

pub struct RawPeer {
    pub socket: UdpSocket,
    relay: SocketAddr,
    index: usize,
    buf: Vec<u8>,
    control: Vec<u8>,
    groups: Vec<u32>,
    /// When the first media datagram arrived (join time).
    pub first_rtp: Option<Instant>,
}

impl RawPeer {
    pub fn new(index: usize, relay: SocketAddr) -> anyhow::Result<RawPeer> {
        let socket = UdpSocket::from_std({
            let s = opencalls_sfu::udp::bind(SocketAddr::new(relay.ip(), 0))?;
            s.set_nonblocking(true)?;
            s
        });
        crate::rx::enable(&socket)?;
        Ok(RawPeer {
            socket,
            relay,
            index,
            buf: vec![0; 2048],
            control: crate::rx::control_buffer(),
            groups: Vec::new(),
            first_rtp: None,
        })
    }

    pub fn subscribe(&mut self, group: u32) -> anyhow::Result<()> {
        self.control(b"SUB", group)?;
        self.groups.push(group);
        Ok(())
    }

    /// Leaves every group (the relay stops sending here).
    pub fn unsubscribe_all(&mut self) {
        for g in std::mem::take(&mut self.groups) {
            let _ = self.control(b"UNS", g);
        }
    }

    fn control(&self, verb: &[u8; 3], group: u32) -> anyhow::Result<()> {
        let mut m = verb.to_vec();
        m.extend_from_slice(&group.to_be_bytes());
        // Loopback does not lose datagrams unless buffers overflow; send twice anyway.
        self.socket.send_to(&m, self.relay)?;
        self.socket.send_to(&m, self.relay)?;
        Ok(())
    }

    /// [group u32][seq u16][send time NTP u64][padding] to the relay.
    pub fn send(&mut self, group: u32, seq: u64, payload_len: usize) {
        let len = payload_len + OVERHEAD;
        let b = &mut self.buf[..len];
        b[..4].copy_from_slice(&group.to_be_bytes());
        b[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        b[6..14].copy_from_slice(&rtp::ntp_now().to_be_bytes());
        let _ = self.socket.send_to(&self.buf[..len], self.relay);
    }

    pub fn read(&mut self, mut meter: Option<&mut Meter>) {
        while let Some(d) = crate::rx::recv(&self.socket, &mut self.buf, &mut self.control) {
            if d.len < 14 {
                continue;
            }
            if self.first_rtp.is_none() {
                self.first_rtp = Some(Instant::now());
            }
            if let Some(m) = meter.as_deref_mut() {
                let b = &self.buf;
                let group = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                let seq = u16::from_be_bytes([b[4], b[5]]);
                let sent = u64::from_be_bytes(b[6..14].try_into().unwrap_or_default());
                m.record(self.index, group, seq, Some(d.times(sent)));
            }
        }
    }
}
