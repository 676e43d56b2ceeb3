//! A WebRTC client for load: str0m for ICE/DTLS/SRTP on publishers, and a "light" mode for
//! subscribers that hands only STUN/DTLS/RTCP to str0m and reads RTP headers itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::net::UdpSocket;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, Extension, ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use crate::rtp::{self, Meter};

/// Extension id both sides use for abs-capture-time.
pub const ABS_ID: u8 = 7;

/// One virtual client.
pub struct BenchPeer {
    rtc: Rtc,
    pub socket: UdpSocket,
    local: SocketAddr,
    pending: Option<SdpPendingOffer>,
    light: bool,
    abs_id: Option<u8>,
    pub connected: bool,
    next_timeout: Instant,
    /// Index used in the meter (stream identity).
    pub index: usize,
    /// When this peer started joining, and when its first RTP arrived.
    pub join_started: Instant,
    pub first_rtp: Option<Instant>,
    buf: Vec<u8>,
    control: Vec<u8>,
    /// Send m-lines the remote asked a keyframe for (PLI/FIR), not yet served.
    keyframe_requests: Vec<Mid>,
}

impl BenchPeer {
    pub fn new(index: usize, light: bool, ip: std::net::IpAddr) -> anyhow::Result<BenchPeer> {
        let now = Instant::now();
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(opencalls_sfu::crypto_provider())
            .set_rtp_mode(true)
            .set_stats_interval(None)
            .set_extension(ABS_ID, Extension::AbsoluteCaptureTime)
            .build(now);
        let std_socket = opencalls_sfu::udp::bind(SocketAddr::new(ip, 0))?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket);
        crate::rx::enable(&socket)?;
        let local = socket.local_addr()?;
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(BenchPeer {
            rtc,
            socket,
            local,
            pending: None,
            light,
            abs_id: None,
            connected: false,
            next_timeout: now,
            keyframe_requests: Vec::new(),
            index,
            join_started: now,
            first_rtp: None,
            buf: vec![0; 2048],
            control: crate::rx::control_buffer(),
        })
    }

    pub fn offer_send(&mut self, kinds: &[MediaKind]) -> (String, Vec<Mid>) {
        let mut api = self.rtc.sdp_api();
        let mids = kinds
            .iter()
            .map(|k| api.add_media(*k, Direction::SendOnly, None, None, None))
            .collect();
        let (offer, pending) = api.apply().expect("changes to offer");
        self.pending = Some(pending);
        (offer.to_sdp_string(), mids)
    }

    pub fn accept_answer(&mut self, sdp: &str) -> anyhow::Result<()> {
        let answer = SdpAnswer::from_sdp_string(sdp)?;
        let pending = self
            .pending
            .take()
            .ok_or_else(|| anyhow::anyhow!("no offer"))?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        self.drain(None);
        Ok(())
    }

    pub fn accept_offer(&mut self, sdp: &str) -> anyhow::Result<String> {
        self.abs_id = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("a=extmap:"))
            .find(|l| l.contains("abs-capture-time"))
            .and_then(|l| l.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok());
        let offer = SdpOffer::from_sdp_string(sdp)?;
        let answer = self.rtc.sdp_api().accept_offer(offer)?;
        self.drain(None);
        Ok(answer.to_sdp_string())
    }

    pub fn pt(&self, codec: Codec) -> u8 {
        self.rtc
            .codec_config()
            .find(|p| p.spec().codec == codec)
            .map(|p| *p.pt())
            .unwrap_or(96)
    }

    /// Sends one RTP packet carrying the capture time.
    #[allow(clippy::too_many_arguments)] // the RTP fields of one packet
    pub fn send(&mut self, mid: Mid, pt: u8, seq: u64, ts: u32, marker: bool, payload: Arc<[u8]>) {
        let now = Instant::now();
        let ext = ExtensionValues {
            abs_capture_time: Some(AbsCaptureTime {
                capture_time: SystemTime::now(),
                clock_offset: None,
            }),
            ..Default::default()
        };
        if let Some(tx) = self.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.write_rtp(
                RtpWrite::new(pt.into(), seq.into(), ts, now, payload)
                    .marker(marker)
                    .ext_vals(ext),
            );
        }
        self.drain(None);
        // str0m's pacer releases what was written only from a timeout: run it now, so the
        // packet leaves when it is stamped (as the raw relay's client sends at once) and not
        // after the generator has written every other publisher's packets.
        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
        self.drain(None);
    }

    /// Whether the remote asked for a keyframe on send m-line `mid` since the last call.
    pub fn take_keyframe_request(&mut self, mid: Mid) -> bool {
        let before = self.keyframe_requests.len();
        self.keyframe_requests.retain(|m| *m != mid);
        self.keyframe_requests.len() != before
    }

    /// Reads everything the socket holds.
    pub fn read(&mut self, mut meter: Option<&mut Meter>) {
        while let Some(d) = crate::rx::recv(&self.socket, &mut self.buf, &mut self.control) {
            let (n, source) = (d.len, d.source);
            let now = Instant::now();
            if self.light && rtp::is_rtp(&self.buf[..n]) {
                if self.first_rtp.is_none() {
                    self.first_rtp = Some(now);
                }
                if let (Some(m), Some((ssrc, seq, cap))) = (
                    meter.as_deref_mut(),
                    rtp::parse(&self.buf[..n], self.abs_id),
                ) {
                    m.record(self.index, ssrc, seq, cap.map(|sent| d.times(sent)));
                }
                continue;
            }
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
            self.drain(meter.as_deref_mut());
        }
    }

    /// Runs str0m's timers if due.
    pub fn tick(&mut self, now: Instant) {
        if now >= self.next_timeout {
            let _ = self.rtc.handle_input(Input::Timeout(now));
            self.drain(None);
        }
    }

    fn drain(&mut self, mut meter: Option<&mut Meter>) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.next_timeout = t.min(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(_) => {
                    self.next_timeout = Instant::now() + Duration::from_millis(100);
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(Event::KeyframeRequest(r))) => {
                    if !self.keyframe_requests.contains(&r.mid) {
                        self.keyframe_requests.push(r.mid);
                    }
                }
                Ok(Output::Event(Event::RtpPacket(p))) => {
                    // Full (non-light) receivers: publishers never get media here.
                    if let Some(m) = meter.as_deref_mut() {
                        m.record(self.index, *p.header.ssrc, p.header.sequence_number, None);
                    }
                }
                Ok(Output::Event(_)) => {}
            }
        }
    }
}
