//! A str0m WebRTC client over loopback UDP.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// One RTP packet a client received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its m-line.
    pub mid: Mid,
    /// Sequence number (extended).
    pub seq: u64,
    /// RTP timestamp.
    pub rtp_time: u32,
    /// Payload type.
    pub pt: u8,
    /// Payload bytes.
    pub payload: Arc<[u8]>,
}

/// A WebRTC client: one RTCPeerConnection's worth of str0m, with its own UDP socket.
pub struct ClientPeer {
    /// The str0m instance (tests may reach in).
    pub rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pending: Option<SdpPendingOffer>,
    /// Whether DTLS came up.
    pub connected: bool,
    /// Every RTP packet received, in arrival order.
    pub received: Vec<Received>,
    /// Keyframe requests the server sent us, by mid.
    pub keyframe_requests: Vec<Mid>,
    /// Mids the server added in its offers.
    pub added: Vec<(Mid, MediaKind)>,
    /// Sender reports received: the mid, the report's RTP time, its packet count, and how
    /// many RTP packets had arrived (`received.len()`) when it came.
    pub sender_reports: Vec<SenderReportSeen>,
    sending: Vec<Mid>,
    /// Indexes (0-based, counting RTP datagrams only) of received RTP datagrams to drop:
    /// simulated loss on the SFU → client hop.
    pub drop_incoming_rtp: Vec<u64>,
    /// Likewise for RTP datagrams this client sends (loss on the client → SFU hop).
    pub drop_outgoing_rtp: Vec<u64>,
    rtp_in: u64,
    rtp_out: u64,
    buf: Vec<u8>,
}

/// A sender report as a test client saw it.
#[derive(Debug, Clone)]
pub struct SenderReportSeen {
    /// The m-line it reports on.
    pub mid: Mid,
    /// The RTP time it maps to its NTP time.
    pub rtp_time: u32,
    /// Packets the sender says it sent.
    pub packet_count: u32,
    /// RTP packets this client had received when the report arrived.
    pub received_before: usize,
}

/// RTP, not RTCP, STUN or DTLS (RFC 7983, RFC 5761).
fn is_rtp(b: &[u8]) -> bool {
    b.len() > 12 && (128..192).contains(&b[0]) && !(192..=223).contains(&b[1])
}

impl ClientPeer {
    /// A client bound to 127.0.0.1 on a free port.
    pub fn new() -> ClientPeer {
        ClientPeer::bound_to("127.0.0.1:0".parse().expect("static address"))
    }

    /// A client bound to `addr` (a port an earlier client used: a new PeerConnection
    /// behind the same address, as a NAT or the OS may hand out again).
    pub fn bound_to(addr: std::net::SocketAddr) -> ClientPeer {
        let now = Instant::now();
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(opencalls_sfu::crypto_provider())
            .set_rtp_mode(true)
            .enable_pcmu(true, false)
            .enable_pcma(true, false)
            .set_stats_interval(None)
            .build(now);
        let socket = UdpSocket::bind(addr).expect("bind client socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(1)))
            .expect("read timeout");
        let local = socket.local_addr().expect("local addr");
        rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"));
        ClientPeer {
            rtc,
            socket,
            local,
            pending: None,
            connected: false,
            received: Vec::new(),
            sender_reports: Vec::new(),
            keyframe_requests: Vec::new(),
            added: Vec::new(),
            sending: Vec::new(),
            drop_incoming_rtp: Vec::new(),
            drop_outgoing_rtp: Vec::new(),
            rtp_in: 0,
            rtp_out: 0,
            buf: vec![0; 2048],
        }
    }

    /// The client's UDP address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// An offer adding send-only m-lines of these kinds; returns (sdp, mids).
    pub fn offer_send(&mut self, kinds: &[MediaKind]) -> (String, Vec<Mid>) {
        let mut api = self.rtc.sdp_api();
        let mids: Vec<Mid> = kinds
            .iter()
            .map(|k| api.add_media(*k, Direction::SendOnly, None, None, None))
            .collect();
        self.sending.extend(&mids);
        let (offer, pending) = api.apply().expect("changes to offer");
        self.pending = Some(pending);
        (offer.to_sdp_string(), mids)
    }

    /// An offer that stops these m-lines (a negotiated close).
    pub fn offer_stop(&mut self, mids: &[Mid]) -> String {
        let mut api = self.rtc.sdp_api();
        for mid in mids {
            api.stop_media(*mid);
        }
        let (offer, pending) = api.apply().expect("changes to offer");
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    /// Applies the server's answer to our last offer.
    pub fn accept_answer(&mut self, sdp: &str) {
        let answer = SdpAnswer::from_sdp_string(sdp).expect("answer parses");
        let pending = self.pending.take().expect("an offer of ours pending");
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("answer accepted");
    }

    /// Answers the server's offer.
    pub fn accept_offer(&mut self, sdp: &str) -> String {
        let offer = SdpOffer::from_sdp_string(sdp).expect("offer parses");
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .expect("offer accepted");
        answer.to_sdp_string()
    }

    /// Our payload type for a codec.
    pub fn pt(&self, codec: Codec) -> u8 {
        *self
            .rtc
            .codec_config()
            .find(|p| p.spec().codec == codec)
            .expect("codec configured")
            .pt()
    }

    /// Sends one RTP packet on a sending m-line. False when the m-line cannot send yet.
    pub fn send_rtp(&mut self, mid: Mid, pt: u8, seq: u64, rtp_time: u32, payload: &[u8]) -> bool {
        let now = Instant::now();
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(pt.into(), seq.into(), rtp_time, now, payload.to_vec())
                .marker(true)
                .nackable(true),
        );
        self.drain();
        true
    }

    /// Asks the server for a keyframe on a receiving m-line.
    pub fn request_keyframe(&mut self, mid: Mid) {
        if let Some(rx) = self.rtc.direct_api().stream_rx_by_mid(mid, None) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
        }
        self.drain();
    }

    /// Mids this client sends on, in SDP order.
    pub fn sending_mids(&self) -> Vec<Mid> {
        self.sending.clone()
    }

    /// Packets received on one mid.
    pub fn received_on(&self, mid: Mid) -> Vec<&Received> {
        self.received.iter().filter(|r| r.mid == mid).collect()
    }

    /// Reads what the socket has and runs timers; returns after at most ~1 ms.
    pub fn step(&mut self) {
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, source)) => {
                if is_rtp(&self.buf[..n]) {
                    self.rtp_in += 1;
                    if self.drop_incoming_rtp.contains(&(self.rtp_in - 1)) {
                        return;
                    }
                }
                let now = Instant::now();
                if let Ok(contents) = self.buf[..n].try_into() {
                    let _ = self.rtc.handle_input(Input::Receive(
                        now,
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: self.local,
                            contents,
                        },
                    ));
                }
            }
            Err(_) => {
                let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
        self.drain();
    }

    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(_)) | Err(_) => return,
                Ok(Output::Transmit(t)) => {
                    if is_rtp(&t.contents) {
                        self.rtp_out += 1;
                        if self.drop_outgoing_rtp.contains(&(self.rtp_out - 1)) {
                            continue;
                        }
                    }
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => self.on_event(e),
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected => self.connected = true,
            Event::MediaAdded(m) => self.added.push((m.mid, m.kind)),
            Event::KeyframeRequest(k) => self.keyframe_requests.push(k.mid),
            Event::SenderFeedback(f) => self.sender_reports.push(SenderReportSeen {
                mid: f.mid,
                rtp_time: f.sender_info.rtp_time.numer() as u32,
                packet_count: f.sender_info.sender_packet_count,
                received_before: self.received.len(),
            }),
            Event::RtpPacket(p) => {
                let ssrc = p.header.ssrc;
                let mid = self.rtc.direct_api().stream_rx(&ssrc).map(|s| s.mid());
                if let Some(mid) = mid {
                    self.received.push(Received {
                        mid,
                        seq: *p.seq_no,
                        rtp_time: p.header.timestamp,
                        pt: *p.header.payload_type,
                        payload: p.payload,
                    });
                }
            }
            _ => {}
        }
    }
}

impl Default for ClientPeer {
    fn default() -> Self {
        Self::new()
    }
}

/// Steps every peer until `done` holds or `limit` passes; returns whether `done` held.
pub fn pump(
    peers: &mut [&mut ClientPeer],
    limit: Duration,
    mut done: impl FnMut(&[&mut ClientPeer]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        for p in peers.iter_mut() {
            p.step();
        }
        if done(peers) {
            return true;
        }
    }
    false
}
