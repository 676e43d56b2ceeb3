//! The one module that drives str0m.
//!
//! [`Peer`] is one server-side PeerConnection (a str0m `Rtc` in RTP mode, ICE-lite) with a
//! small surface in our own words: SDP in and out as text, datagrams and time in, and
//! [`PeerOutput`] values out. str0m makes breaking releases about monthly; keeping every
//! call into it here means an upgrade touches this file only.
//!
//! Invariant: after every mutation the caller drains [`Peer::poll`] until it returns
//! [`PeerOutput::Timeout`] (str0m's single-mutation invariant). One exception:
//! [`Peer::write_rtp`] only queues the packet, so the caller may instead run
//! [`Peer::handle_timeout`] (soon) and drain after that.

mod dtls;
mod feedback;
mod ingress;
mod srtp;

pub use dtls::crypto_provider;
pub use ingress::IngressCounts;
pub(crate) use srtp::WIDE_FAN_OUT;
pub use srtp::{select_aes_gcm, AesGcm, AesGcmChoice};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, Extension, RtpWrite, VideoOrientation};

/// Video packets kept per send stream for retransmission.
pub const VIDEO_SEND_BUFFER: usize = 400;

/// Header extension id we offer for abs-capture-time (unused by str0m's standard map).
pub const ABS_CAPTURE_TIME_ID: u8 = 7;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig, RtcError};

pub use str0m::format::CodecSpec;
pub use str0m::media::{Mid, Rid};
pub use str0m::rtp::ExtensionValues;

/// A DTLS certificate shared by every session of the process (building one per session
/// costs milliseconds; the fingerprint is public anyway).
#[derive(Clone)]
pub struct Certificate(str0m::config::DtlsCert);

impl Certificate {
    /// Generates a self-signed certificate with the default crypto provider.
    pub fn generate() -> Result<Certificate, PeerError> {
        let provider = str0m::crypto::from_feature_flags();
        provider
            .dtls_provider
            .generate_certificate()
            .map(Certificate)
            .ok_or_else(|| PeerError::Internal("cannot generate a DTLS certificate".into()))
    }
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificate")
    }
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Audio m-line.
    Audio,
    /// Video m-line.
    Video,
}

impl Kind {
    /// `"audio"` / `"video"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Video => "video",
        }
    }

    fn from_str0m(k: MediaKind) -> Kind {
        match k {
            MediaKind::Audio => Kind::Audio,
            MediaKind::Video => Kind::Video,
        }
    }

    fn to_str0m(self) -> MediaKind {
        match self {
            Kind::Audio => MediaKind::Audio,
            Kind::Video => MediaKind::Video,
        }
    }
}

/// Why a peer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The remote SDP could not be parsed or was not acceptable.
    #[error("{0}")]
    Sdp(String),
    /// An answer arrived while no offer of ours was pending.
    #[error("no pending offer to answer")]
    NoPendingOffer,
    /// str0m failed internally.
    #[error("{0}")]
    Internal(String),
}

impl From<RtcError> for PeerError {
    fn from(e: RtcError) -> Self {
        match e {
            RtcError::RemoteSdp(s) => PeerError::Sdp(s),
            RtcError::Sdp(s) => PeerError::Sdp(s.to_string()),
            RtcError::ChangesOutOfOrder => PeerError::NoPendingOffer,
            other => PeerError::Internal(other.to_string()),
        }
    }
}

/// A received RTP packet, decrypted and parsed.
#[derive(Debug, Clone)]
pub struct RtpIn {
    /// The m-line it belongs to.
    pub mid: Mid,
    /// Simulcast layer, when the publisher sends several.
    pub rid: Option<Rid>,
    /// The codec of the payload.
    pub codec: Option<CodecSpec>,
    /// Extended (roll-over free) sequence number.
    pub seq: u64,
    /// RTP timestamp.
    pub rtp_time: u32,
    /// Marker bit.
    pub marker: bool,
    /// Header extension values worth forwarding.
    pub ext: ExtensionValues,
    /// The RTP payload (shared, never copied per subscriber).
    pub payload: Arc<[u8]>,
}

/// Something the peer tells its owner.
// RTP events dominate and are moved straight into the forwarder; boxing them would cost
// an allocation per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PeerEvent {
    /// ICE and DTLS are up: media can flow.
    Connected,
    /// ICE lost the peer (it may come back).
    Disconnected,
    /// ICE is connected again after [`PeerEvent::Disconnected`].
    Reconnected,
    /// An RTP packet arrived on a receiving m-line.
    Rtp(RtpIn),
    /// The remote asked for a keyframe on one of our sending m-lines.
    KeyframeRequest {
        /// Our sending m-line.
        mid: Mid,
        /// FIR rather than PLI.
        fir: bool,
    },
}

/// What [`Peer::poll`] yields.
// Same reason as PeerEvent: no per-packet boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PeerOutput {
    /// A datagram to send.
    Transmit {
        /// Where to.
        destination: SocketAddr,
        /// From which of our addresses.
        source: SocketAddr,
        /// The bytes.
        contents: Vec<u8>,
    },
    /// An event.
    Event(PeerEvent),
    /// Nothing more now; call again at this time.
    Timeout(Instant),
}

/// Which way media flows on an m-line, seen from the SFU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The SFU sends (a pulled track).
    Send,
    /// The SFU receives (a track published without a client offer).
    Recv,
    /// Both (`bidirectionalMediaStream`).
    SendRecv,
}

/// An m-line the SFU adds in its own offer.
#[derive(Debug, Clone)]
pub struct NewMedia {
    /// Audio or video.
    pub kind: Kind,
    /// Direction from the SFU's side.
    pub flow: Flow,
    /// `a=msid` stream id.
    pub stream_id: String,
    /// `a=msid` track id.
    pub track_id: String,
}

/// One server-side PeerConnection.
pub struct Peer {
    rtc: Rtc,
    pending: Option<SdpPendingOffer>,
    ufrag: String,
    ice_connected: bool,
    was_connected: bool,
    /// Payload type → codec, learned lazily per peer.
    codecs: HashMap<u8, Option<CodecSpec>>,
    /// The SRTP keying material our DTLS endpoint exports (filled once, after DTLS).
    keys: dtls::KeySlot,
    /// Our sending SRTP context for packets str0m never sees; built at first use after
    /// DTLS (`Some(None)`: the profile stays with str0m).
    sealer: Option<Option<srtp::Sealer>>,
    /// Our look at the remote's SRTCP (str0m opens its own copy): the NACKs on packets
    /// str0m never sent, the sender reports for the receive path's reports. One opener for
    /// both, each datagram opened at most once; built at first use after DTLS.
    rtcp_opener: Option<Option<srtp::Opener>>,
    /// Who sends retransmissions on each sending m-line's RTX SSRC. Decided once per
    /// m-line and never changed: two senders numbering one SSRC would seal two packets
    /// under one SRTP index.
    rtx: Vec<(Mid, RtxSender)>,
    /// Scratch for opened SRTCP.
    rtcp: Vec<u8>,
    /// Who receives the remote's RTP (see [`IngressPath`]).
    receive: ReceivePath,
    /// The m-lines of the negotiation so far (the receive path beside str0m reads the
    /// extension ids from one of them).
    mids: Vec<Mid>,
    /// Our address and the remote's, as the last RTP datagram came: where the receive path
    /// beside str0m sends its feedback.
    path: Option<(SocketAddr, SocketAddr)>,
    /// str0m's deadline, while nothing was handed to str0m since it named it: until then
    /// [`Peer::poll`] and [`Peer::handle_timeout`] leave str0m alone (a poll walks all its
    /// streams), so the receive path's own timers cost str0m nothing. Every method that
    /// hands str0m something clears it.
    str0m_next: Option<Instant>,
}

/// Who opens a publisher's RTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IngressPath {
    /// str0m, as everything else.
    Str0m,
    /// Our own path beside str0m (`peer/ingress.rs`): SRTP, replay window, transport-cc
    /// feedback, NACKs, RTX and receiver reports of its own, str0m kept for the publisher's
    /// RTCP and keyframe requests. Taken per peer at its first RTP packet where DTLS exported
    /// an AES-GCM profile; str0m keeps the others.
    #[default]
    Beside,
}

/// The receive path a peer settled on.
#[derive(Debug)]
enum ReceivePath {
    /// No RTP authenticated yet: decided at the first RTP packet after DTLS.
    Undecided,
    Str0m,
    Beside(Box<ingress::Ingress>),
}

/// What became of a datagram [`Peer::handle_receive`] took.
// The RTP packet moves straight into the forwarder (no boxing, as PeerEvent).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Received {
    /// str0m took it: drain [`Peer::poll`] now.
    Str0m,
    /// An RTP packet the path beside str0m opened: nothing to drain, but run
    /// [`Peer::handle_timeout`] by [`Peer::ingress_deadline`].
    Rtp(RtpIn),
    /// Authentic RTP with nothing to forward (padding, a duplicate, a stream not known yet).
    Kept,
    /// RTP that did not parse, authenticate or was a replay: dropped.
    Dropped,
}

/// The sender of one m-line's retransmissions.
#[derive(Debug, Clone, Copy)]
enum RtxSender {
    /// str0m, from its own send buffer (packets written NACK-able).
    Str0m,
    /// We, from the worker's history; str0m gets every packet not NACK-able.
    Us {
        ssrc: u32,
        rtx_ssrc: u32,
        /// Next RTX sequence number (SRTP index) to use.
        next: u64,
    },
}

/// How a packet on one of our sending m-lines can leave without str0m (see
/// [`Peer::egress_stream`]).
#[derive(Debug, Clone)]
pub struct EgressStream {
    mid: Mid,
    ssrc: u32,
    pt: u8,
    /// Negotiated one-byte extension id for abs-capture-time.
    abs_capture_time: Option<u8>,
    /// The MID extension element (one-byte header, then the MID; receivers bind the SSRC
    /// with it), written once here: `element[..len]`, empty where MID was not negotiated.
    mid_element: ([u8; 17], usize),
    /// The RTX payload type, where the payload type is NACK-able: the caller then keeps
    /// what it sends in a history and answers NACKs ([`Peer::handle_receive`],
    /// [`Peer::seal_rtx`]).
    rtx_pt: Option<u8>,
}

/// A packet sent earlier, as [`Peer::seal_rtx`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct RtpRef<'a> {
    /// Payload type it had.
    pub pt: u8,
    /// Its extended sequence number.
    pub seq: u64,
    /// Its RTP time.
    pub rtp_time: u32,
    /// Its marker bit.
    pub marker: bool,
    /// Its payload.
    pub payload: &'a [u8],
}

impl EgressStream {
    /// Whether NACKs for this stream are ours to answer.
    pub fn resends(&self) -> bool {
        self.rtx_pt.is_some()
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("ufrag", &self.ufrag).finish()
    }
}

/// How a [`Peer`] is built.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The process-wide certificate.
    pub certificate: Certificate,
    /// Host candidates to advertise (the worker's socket addresses).
    pub candidates: Vec<SocketAddr>,
    /// Who opens the remote's RTP.
    pub ingress: IngressPath,
}

impl Peer {
    /// Builds a peer. Tens of microseconds (the DTLS config is built once per process, see
    /// [`dtls`]); still done off the media threads.
    pub fn new(config: &PeerConfig, now: Instant) -> Result<Peer, PeerError> {
        let keys = dtls::KeySlot::default();
        let mut rtc = dtls::with_key_slot(&keys, || {
            RtcConfig::new()
                .set_ice_lite(true)
                .set_rtp_mode(true)
                .set_crypto_provider(dtls::crypto_provider())
                .set_dtls_cert(config.certificate.0.clone())
                .enable_pcmu(true, false)
                .enable_pcma(true, false)
                .set_stats_interval(None)
                // The send ring buffer doubles as the RTX cache. str0m's default (1000 video
                // packets, ~5 s at 1.5 Mbit/s) is far more history than a NACK ever asks for;
                // 400 (~2 s, several keyframes) keeps per-subscriber memory down.
                .set_send_buffer_video(VIDEO_SEND_BUFFER)
                // Capture time travels end to end: receivers (and our benchmark) measure latency.
                .set_extension(ABS_CAPTURE_TIME_ID, Extension::AbsoluteCaptureTime)
                .build(now)
        });
        for addr in &config.candidates {
            let c =
                Candidate::host(*addr, "udp").map_err(|e| PeerError::Internal(e.to_string()))?;
            rtc.add_local_candidate(c);
        }
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        Ok(Peer {
            rtc,
            pending: None,
            ufrag,
            ice_connected: false,
            was_connected: false,
            codecs: HashMap::new(),
            keys,
            sealer: None,
            rtcp_opener: None,
            rtx: Vec::new(),
            rtcp: Vec::new(),
            receive: match config.ingress {
                IngressPath::Str0m => ReceivePath::Str0m,
                IngressPath::Beside => ReceivePath::Undecided,
            },
            mids: Vec::new(),
            path: None,
            str0m_next: None,
        })
    }

    /// Our ICE username fragment: the key that demultiplexes a new client address.
    pub fn ice_ufrag(&self) -> &str {
        &self.ufrag
    }

    /// Whether ICE and DTLS have come up at least once.
    pub fn was_connected(&self) -> bool {
        self.was_connected
    }

    /// Whether an offer of ours waits for its answer.
    pub fn has_pending_offer(&self) -> bool {
        self.pending.is_some()
    }

    /// Checks that `sdp` parses as an offer, without touching the session.
    pub fn check_offer(sdp: &str) -> Result<(), PeerError> {
        SdpOffer::from_sdp_string(sdp)
            .map(|_| ())
            .map_err(|e| PeerError::Sdp(e.to_string()))
    }

    /// Accepts the client's offer and returns our answer.
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String, PeerError> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        self.str0m_next = None;
        let answer = self.rtc.sdp_api().accept_offer(offer)?;
        self.pending = None;
        self.renegotiated();
        self.remember_mids(
            sdp.lines()
                .filter_map(|l| l.trim().strip_prefix("a=mid:"))
                .map(Mid::from),
        );
        Ok(answer.to_sdp_string())
    }

    /// Creates an offer adding `medias`; returns the SDP and the new mids in order.
    pub fn create_offer(&mut self, medias: &[NewMedia]) -> Result<(String, Vec<Mid>), PeerError> {
        self.str0m_next = None;
        let mut api = self.rtc.sdp_api();
        let mids: Vec<Mid> = medias
            .iter()
            .map(|m| {
                let dir = match m.flow {
                    Flow::Send => Direction::SendOnly,
                    Flow::Recv => Direction::RecvOnly,
                    Flow::SendRecv => Direction::SendRecv,
                };
                api.add_media(
                    m.kind.to_str0m(),
                    dir,
                    Some(m.stream_id.clone()),
                    Some(m.track_id.clone()),
                    None,
                )
            })
            .collect();
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| PeerError::Internal("offer without changes".into()))?;
        self.pending = Some(pending);
        self.remember_mids(mids.iter().copied());
        Ok((offer.to_sdp_string(), mids))
    }

    /// Applies the client's answer to our pending offer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), PeerError> {
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        let pending = self.pending.take().ok_or(PeerError::NoPendingOffer)?;
        self.str0m_next = None;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        self.renegotiated();
        Ok(())
    }

    /// Drops our pending offer (its m-lines are never created).
    pub fn rollback_offer(&mut self) {
        self.pending = None;
    }

    /// The kind of an m-line and whether we receive on it.
    pub fn media(&self, mid: Mid) -> Option<(Kind, bool)> {
        let m = self.rtc.media(mid)?;
        if m.disabled() {
            return None;
        }
        Some((Kind::from_str0m(m.kind()), m.direction().is_receiving()))
    }

    /// Whether we may send on an m-line (a `#trackName` pull reuses a sendrecv one).
    pub fn can_send(&self, mid: Mid) -> bool {
        self.rtc
            .media(mid)
            .is_some_and(|m| !m.disabled() && m.direction().is_sending())
    }

    /// Every receiving m-line, in SDP order (autoDiscover).
    pub fn receiving_mids(&self, mids_in_offer: &[Mid]) -> Vec<(Mid, Kind)> {
        mids_in_offer
            .iter()
            .filter_map(|mid| match self.media(*mid) {
                Some((kind, true)) => Some((*mid, kind)),
                _ => None,
            })
            .collect()
    }

    /// Our payload type for `codec` on sending m-line `mid`, if the remote accepted it.
    pub fn send_pt(&self, mid: Mid, codec: &CodecSpec) -> Option<u8> {
        let media = self.rtc.media(mid)?;
        let cfg = self.rtc.codec_config();
        let wanted = PayloadParams::new(0.into(), None, *codec);
        let params = cfg.match_params(wanted)?;
        let pt = params.pt();
        media.remote_pts().contains(&pt).then(|| *pt)
    }

    /// Adds the m-lines not known yet to `mids`.
    fn remember_mids(&mut self, mids: impl IntoIterator<Item = Mid>) {
        for mid in mids {
            if !self.mids.contains(&mid) {
                self.mids.push(mid);
            }
        }
    }

    /// Payload types and extension ids may have changed.
    fn renegotiated(&mut self) {
        self.codecs.clear();
        if let ReceivePath::Beside(ingress) = &mut self.receive {
            ingress.renegotiated();
        }
    }

    /// Feeds a datagram from the network. RTP goes to the receive path beside str0m where
    /// this peer took it (see [`IngressPath`]); everything else to str0m. `nacks` gets the
    /// sequence numbers that generic NACKs in an SRTCP datagram ask for on m-lines whose
    /// retransmissions are ours (see [`Peer::egress_stream`]), as `(mid, seq)`.
    pub fn handle_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
        nacks: &mut Vec<(Mid, u16)>,
    ) -> Result<Received, PeerError> {
        nacks.clear();
        if is_rtp(contents) {
            if matches!(self.receive, ReceivePath::Undecided) {
                // Before DTLS exported keys str0m cannot open RTP either (it drops it and
                // counts nothing): the choice waits for the first packet after.
                if let Some(exported) = self.keys.get() {
                    let provider = dtls::crypto_provider().srtp_provider;
                    self.receive = match ingress::Ingress::new(exported, provider, now) {
                        Some(ingress) => ReceivePath::Beside(Box::new(ingress)),
                        None => ReceivePath::Str0m,
                    };
                    tracing::debug!(
                        ufrag = %self.ufrag,
                        beside = matches!(self.receive, ReceivePath::Beside(_)),
                        "receive path settled"
                    );
                }
            }
            if let ReceivePath::Beside(ingress) = &mut self.receive {
                self.path = Some((destination, source));
                let verdict = ingress.receive(&mut self.rtc, &self.mids, contents, now);
                if ingress.take_touched_str0m() {
                    self.str0m_next = None;
                }
                return Ok(match verdict {
                    ingress::Verdict::Rtp(rtp) => Received::Rtp(rtp),
                    ingress::Verdict::Kept => Received::Kept,
                    ingress::Verdict::Dropped => Received::Dropped,
                });
            }
        }
        if feedback::is_rtcp(contents) {
            self.read_rtcp(contents, now, nacks);
        }
        self.str0m_next = None;
        let contents = contents
            .try_into()
            .map_err(|_| PeerError::Internal("unrecognised datagram".into()))?;
        self.rtc.handle_input(Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination,
                contents,
            },
        ))?;
        Ok(Received::Str0m)
    }

    /// What the receive path beside str0m did since the last call, where this peer took it.
    pub fn take_ingress_counts(&mut self) -> Option<IngressCounts> {
        match &mut self.receive {
            ReceivePath::Beside(ingress) => Some(ingress.take_counts()),
            _ => None,
        }
    }

    /// When the receive path beside str0m needs [`Peer::handle_timeout`] (its feedback), if
    /// it does. [`Peer::poll`]'s timeouts include it.
    pub fn ingress_deadline(&self) -> Option<Instant> {
        match &self.receive {
            ReceivePath::Beside(ingress) => ingress.deadline(),
            _ => None,
        }
    }

    /// Advances time: the receive path's timers and str0m's, each if due.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), PeerError> {
        if let ReceivePath::Beside(ingress) = &mut self.receive {
            if ingress.deadline().is_some_and(|t| t <= now) {
                ingress.handle_timeout(now);
            }
        }
        if self.str0m_next.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.str0m_next = None;
        self.rtc.handle_input(Input::Timeout(now))?;
        Ok(())
    }

    /// Sends one RTP packet on sending m-line `mid`. Returns false when the m-line has no
    /// send stream (not negotiated yet, or stopped).
    ///
    /// The packet waits in str0m's send queue: its pacer releases it at the next
    /// [`Peer::handle_timeout`], and nothing becomes pollable before that. So the caller
    /// need not drain between this write and that timeout (a poll there would only walk
    /// str0m's state to name the deadline "now" again); it must run the timeout soon.
    #[allow(clippy::too_many_arguments)] // one RTP packet's fields; a struct would only be unpacked again
    pub fn write_rtp(
        &mut self,
        mid: Mid,
        pt: u8,
        seq: u64,
        rtp_time: u32,
        marker: bool,
        ext: ExtensionValues,
        payload: Arc<[u8]>,
        now: Instant,
    ) -> bool {
        let sender = self.rtx_sender(mid);
        self.str0m_next = None;
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        // Before DTLS nobody can own the RTX SSRC yet: nothing written then is NACK-able.
        // After it, str0m answers NACKs unless we took the m-line (see `egress_stream`).
        let nackable = self.was_connected
            && match sender {
                Some(RtxSender::Us { .. }) => false,
                Some(RtxSender::Str0m) => true,
                None => {
                    self.rtx.push((mid, RtxSender::Str0m));
                    true
                }
            };
        tx.write_rtp(
            RtpWrite::new(pt.into(), seq.into(), rtp_time, now, payload)
                .marker(marker)
                .ext_vals(ext)
                .nackable(nackable),
        );
        true
    }

    fn rtx_sender(&self, mid: Mid) -> Option<RtxSender> {
        self.rtx.iter().find(|(m, _)| *m == mid).map(|(_, r)| *r)
    }

    /// Whether packets of payload type `pt` on sending m-line `mid` can leave without str0m,
    /// and how. Once DTLS exported AES-GCM keys (other profiles stay with str0m). Where the
    /// payload type is NACK-able (video), only with RTX negotiated and while str0m never
    /// sent a NACK-able packet on the m-line: the m-line's retransmissions become ours for
    /// good ([`EgressStream::resends`]), also for the packets still written through str0m.
    /// The caller still writes a packet through str0m now and then ([`Peer::write_rtp`]):
    /// str0m's sender reports take their RTP time from its last write, and receivers need
    /// them for A/V sync.
    pub fn egress_stream(&mut self, mid: Mid, pt: u8) -> Option<EgressStream> {
        if self.sealer.is_none() {
            let exported = self.keys.get()?;
            let provider = dtls::crypto_provider().srtp_provider;
            let sealer = srtp::Sealer::new(exported, provider);
            tracing::debug!(
                ufrag = %self.ufrag,
                profile = ?exported.profile,
                egress = sealer.is_some(),
                "SRTP keys exported"
            );
            self.sealer = Some(sealer);
        }
        self.sealer.as_ref()?.as_ref()?;
        let (nack, rtx_pt) = self
            .rtc
            .codec_config()
            .find(|p| *p.pt() == pt)
            .map(|p| (p.fb_nack(), p.resend().map(|r| *r)))?;
        let media = self.rtc.media(mid)?;
        if media.disabled() || !media.direction().is_sending() {
            return None;
        }
        let exts = media.remote_extmap();
        // One-byte header extensions carry ids 1 to 14 only.
        let one_byte = |id: Option<u8>| id.filter(|id| (1..=14).contains(id));
        let abs_capture_time = one_byte(exts.id_of(Extension::AbsoluteCaptureTime));
        let mid_ext = one_byte(exts.id_of(Extension::RtpMid));
        self.str0m_next = None;
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None)?;
        let (ssrc, rtx_ssrc) = (*tx.ssrc(), tx.rtx().map(|r| *r));
        let rtx_pt = if nack {
            let (rtx_pt, rtx_ssrc) = rtx_pt.zip(rtx_ssrc)?;
            let sender = self.rtx.iter_mut().find(|(m, _)| *m == mid).map(|(_, r)| r);
            match sender {
                Some(RtxSender::Str0m) => return None,
                // Follow the m-line's current SSRCs; the numbering goes on (a new RTX SSRC
                // starts a new IV space, so continuing is as safe as starting over).
                Some(RtxSender::Us {
                    ssrc: s,
                    rtx_ssrc: r,
                    ..
                }) => (*s, *r) = (ssrc, rtx_ssrc),
                None => self.rtx.push((
                    mid,
                    RtxSender::Us {
                        ssrc,
                        rtx_ssrc,
                        // RFC 3550 §5.1: a random start. Below 2^15, as the rewriter's.
                        next: u64::from(rand::random_range(1000u16..30000)),
                    },
                )),
            }
            Some(rtx_pt)
        } else {
            None
        };
        let mut mid_element = ([0u8; 17], 0);
        if let Some(id) = mid_ext {
            let bytes = mid.as_bytes();
            if (1..=16).contains(&bytes.len()) {
                mid_element.0[0] = (id << 4) | (bytes.len() as u8 - 1);
                mid_element.0[1..=bytes.len()].copy_from_slice(bytes);
                mid_element.1 = 1 + bytes.len();
            }
        }
        Some(EgressStream {
            mid,
            ssrc,
            pt,
            abs_capture_time,
            mid_element,
            rtx_pt,
        })
    }

    /// Reads what this peer needs from an SRTCP datagram beside str0m (which still gets it):
    /// the NACKs on m-lines whose retransmissions are ours, into `nacks`, and the sender
    /// reports for the receive path beside str0m. Opens the datagram once, and only if one
    /// of them may be in it.
    fn read_rtcp(&mut self, datagram: &[u8], now: Instant, nacks: &mut Vec<(Mid, u16)>) {
        let ours = |r: &(Mid, RtxSender)| matches!(r.1, RtxSender::Us { .. });
        let want_nacks = matches!(self.sealer, Some(Some(_))) && self.rtx.iter().any(ours);
        let ingress = match &mut self.receive {
            ReceivePath::Beside(ingress) if ingress::starts_with_sender_report(datagram) => {
                Some(ingress)
            }
            _ => None,
        };
        if !want_nacks && ingress.is_none() {
            return;
        }
        if self.rtcp_opener.is_none() {
            let Some(exported) = self.keys.get() else {
                return;
            };
            let provider = dtls::crypto_provider().srtp_provider;
            self.rtcp_opener = Some(srtp::Opener::new(exported, provider));
        }
        let Some(Some(opener)) = &mut self.rtcp_opener else {
            return;
        };
        if !opener.open(datagram, &mut self.rtcp) {
            return;
        }
        if let Some(ingress) = ingress {
            ingress.read_sender_reports(&self.rtcp, now);
        }
        if !want_nacks {
            return;
        }
        let rtx = &self.rtx;
        feedback::for_each_nack(&self.rtcp, |media_ssrc, seq| {
            let mid = rtx.iter().find_map(|(mid, r)| match r {
                RtxSender::Us { ssrc, .. } if *ssrc == media_ssrc => Some(*mid),
                _ => None,
            });
            if let Some(mid) = mid {
                nacks.push((mid, seq));
            }
        });
    }

    /// An RTX packet (RFC 4588) carrying a packet sent earlier on `stream` (its payload
    /// type, sequence number, RTP time, marker and payload), sealed and appended to `out`.
    /// False (and `out` unchanged) unless the m-line's retransmissions are ours and the
    /// packet had the stream's payload type.
    pub fn seal_rtx(&mut self, out: &mut Vec<u8>, stream: &EgressStream, sent: RtpRef<'_>) -> bool {
        let Some(rtx_pt) = stream.rtx_pt.filter(|_| sent.pt == stream.pt) else {
            return false;
        };
        let Some((rtx_ssrc, next)) = self.rtx.iter_mut().find_map(|(mid, r)| match r {
            RtxSender::Us { rtx_ssrc, next, .. } if *mid == stream.mid => Some((*rtx_ssrc, next)),
            _ => None,
        }) else {
            return false;
        };
        let index = *next;
        let Some(sealer) = self.sealer.as_mut().and_then(|s| s.as_mut()) else {
            return false;
        };
        let head = out.len();
        rtp_header(out, sent.marker, rtx_pt, index, sent.rtp_time, rtx_ssrc);
        // The MID extension only (no extension values): the capture time belongs to the
        // first transmission.
        write_extensions(out, head, stream, None);
        let body = out.len();
        out.extend_from_slice(&(sent.seq as u16).to_be_bytes());
        out.extend_from_slice(sent.payload);
        // A retransmission goes to one subscriber.
        if !sealer.seal(out, head, body, rtx_ssrc, index, 1) {
            return false;
        }
        // Used even if the caller drops the packet now: an index is sealed once.
        *next += 1;
        true
    }

    /// One SRTP packet for `stream`, sealed with our sending keys and appended to `out`, for
    /// the caller to send to the peer's address; false (and `out` unchanged) without keys of
    /// ours. `seq` is the extended sequence number: the SRTP index, so the caller must never
    /// hand the same one to str0m as well. `fan_out`: how many subscribers the packet is
    /// being sealed for (see `Sealer::seal`).
    #[allow(clippy::too_many_arguments)] // one RTP packet's fields, as in write_rtp
    pub fn seal_rtp(
        &mut self,
        out: &mut Vec<u8>,
        stream: &EgressStream,
        pt: u8,
        seq: u64,
        rtp_time: u32,
        marker: bool,
        abs_capture_time: Option<&CaptureTime>,
        payload: &[u8],
        fan_out: usize,
    ) -> bool {
        let Some(sealer) = self.sealer.as_mut().and_then(|s| s.as_mut()) else {
            return false;
        };
        let head = out.len();
        out.reserve(12 + 4 + 20 + payload.len() + srtp::TAG);
        rtp_header(out, marker, pt, seq, rtp_time, stream.ssrc);
        write_extensions(out, head, stream, abs_capture_time);
        let body = out.len();
        out.extend_from_slice(payload);
        sealer.seal(out, head, body, stream.ssrc, seq, fan_out)
    }

    /// Asks the remote for a keyframe on receiving m-line `mid`.
    pub fn request_keyframe(&mut self, mid: Mid, rid: Option<Rid>, fir: bool) {
        let kind = if fir {
            KeyframeRequestKind::Fir
        } else {
            KeyframeRequestKind::Pli
        };
        self.str0m_next = None;
        if let Some(rx) = self.rtc.direct_api().stream_rx_by_mid(mid, rid) {
            rx.request_keyframe(kind);
        }
    }

    /// Closes the connection (DTLS close alert) and stops all timers.
    pub fn disconnect(&mut self) {
        self.str0m_next = None;
        self.rtc.disconnect();
    }

    /// Next output. Events str0m emits that nobody here needs are skipped.
    pub fn poll(&mut self) -> Result<PeerOutput, PeerError> {
        if let (ReceivePath::Beside(ingress), Some((source, destination))) =
            (&mut self.receive, self.path)
        {
            if let Some(contents) = ingress.poll_datagram() {
                return Ok(PeerOutput::Transmit {
                    destination,
                    source,
                    contents,
                });
            }
        }
        if let Some(t) = self.str0m_next {
            let t = self.ingress_deadline().map_or(t, |i| i.min(t));
            return Ok(PeerOutput::Timeout(t));
        }
        loop {
            let out = self.rtc.poll_output()?;
            let ev = match out {
                Output::Timeout(t) => {
                    self.str0m_next = Some(t);
                    let t = self.ingress_deadline().map_or(t, |i| i.min(t));
                    return Ok(PeerOutput::Timeout(t));
                }
                Output::Transmit(t) => {
                    return Ok(PeerOutput::Transmit {
                        destination: t.destination,
                        source: t.source,
                        contents: t.contents.into(),
                    })
                }
                Output::Event(ev) => ev,
            };
            let mapped = match ev {
                Event::Connected => {
                    self.was_connected = true;
                    Some(PeerEvent::Connected)
                }
                Event::IceConnectionStateChange(s) => match s {
                    IceConnectionState::Disconnected => {
                        self.ice_connected = false;
                        Some(PeerEvent::Disconnected)
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed => {
                        let again = !self.ice_connected && self.was_connected;
                        self.ice_connected = true;
                        again.then_some(PeerEvent::Reconnected)
                    }
                    _ => None,
                },
                Event::RtpPacket(p) => self.rtp_in(p).map(PeerEvent::Rtp),
                Event::KeyframeRequest(r) => Some(PeerEvent::KeyframeRequest {
                    mid: r.mid,
                    fir: matches!(r.kind, KeyframeRequestKind::Fir),
                }),
                _ => None,
            };
            if let Some(e) = mapped {
                return Ok(PeerOutput::Event(e));
            }
        }
    }

    fn rtp_in(&mut self, p: str0m::rtp::RtpPacket) -> Option<RtpIn> {
        let ssrc = p.header.ssrc;
        let (mid, rid) = {
            let mut api = self.rtc.direct_api();
            let rx = api.stream_rx(&ssrc)?;
            (rx.mid(), rx.rid().or(p.header.ext_vals.rid))
        };
        let pt = *p.header.payload_type;
        let codec = match self.codecs.get(&pt) {
            Some(c) => *c,
            None => {
                let c = self
                    .rtc
                    .codec_config()
                    .find(|params| *params.pt() == pt)
                    .map(|params| params.spec());
                self.codecs.insert(pt, c);
                c
            }
        };
        Some(RtpIn {
            mid,
            rid,
            codec,
            seq: *p.seq_no,
            rtp_time: p.header.timestamp,
            marker: p.header.marker,
            ext: p.header.ext_vals,
            payload: p.payload,
        })
    }
}

/// Whether a datagram is RTP: RFC 7983's range for RTP and RTCP (first octet 128–191), and
/// not RTCP (RFC 5761 §4: packet types 192–223 in the second octet).
fn is_rtp(datagram: &[u8]) -> bool {
    datagram.len() >= 12 && (128..=191).contains(&datagram[0]) && !feedback::is_rtcp(datagram)
}

/// Appends a 12-byte RTP header (no CSRC).
fn rtp_header(packet: &mut Vec<u8>, marker: bool, pt: u8, seq: u64, rtp_time: u32, ssrc: u32) {
    let mut header = [0u8; 12];
    header[0] = 0x80;
    header[1] = (u8::from(marker) << 7) | (pt & 0x7f);
    header[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
    header[4..8].copy_from_slice(&rtp_time.to_be_bytes());
    header[8..].copy_from_slice(&ssrc.to_be_bytes());
    packet.extend_from_slice(&header);
}

/// The header extensions that describe the media and so travel end to end; the others
/// (transport-cc, abs-send-time, mid, rid) belong to one hop. A quarter the size of str0m's
/// `ExtensionValues`, which a forwarded packet carries to every worker it goes to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndToEnd {
    audio_level: Option<i8>,
    voice_activity: Option<bool>,
    video_orientation: Option<VideoOrientation>,
    abs_capture_time: Option<AbsCaptureTime>,
}

impl EndToEnd {
    /// The end-to-end values among `ext`.
    pub fn of(ext: &ExtensionValues) -> EndToEnd {
        EndToEnd {
            audio_level: ext.audio_level,
            voice_activity: ext.voice_activity,
            video_orientation: ext.video_orientation,
            abs_capture_time: ext.abs_capture_time,
        }
    }

    /// As str0m writes them, with no per-hop value set.
    pub fn values(&self) -> ExtensionValues {
        ExtensionValues {
            audio_level: self.audio_level,
            voice_activity: self.voice_activity,
            video_orientation: self.video_orientation,
            abs_capture_time: self.abs_capture_time,
            ..Default::default()
        }
    }
}

/// The abs-capture-time extension's value (after its one-byte element header), encoded once
/// per forwarded packet: every subscriber's copy carries the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureTime {
    bytes: [u8; 16],
    /// 8 (NTP time only) or 16 (with the estimated clock offset).
    len: u8,
}

impl CaptureTime {
    /// The value of `ext`'s abs-capture-time, if it has one: the capture time as 64-bit NTP
    /// (UQ32.32 since 1900) and, if known, the sender's clock offset.
    pub fn of(ext: &ExtensionValues) -> Option<CaptureTime> {
        let act = ext.abs_capture_time.as_ref()?;
        let since = act
            .capture_time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let frac = (u64::from(since.subsec_nanos()) << 32) / 1_000_000_000;
        let ntp = ((since.as_secs() + 2_208_988_800) << 32) | frac;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&ntp.to_be_bytes());
        let len = match act.clock_offset {
            Some(offset) => {
                bytes[8..].copy_from_slice(&offset.to_be_bytes());
                16
            }
            None => 8,
        };
        Some(CaptureTime { bytes, len })
    }
}

/// Appends the one-byte-header extension block (RFC 8285) for `stream`'s negotiated
/// extensions to the packet whose header starts at `head`, and sets the header's X bit, if
/// any applies.
fn write_extensions(
    packet: &mut Vec<u8>,
    head: usize,
    stream: &EgressStream,
    abs_capture_time: Option<&CaptureTime>,
) {
    let start = packet.len();
    packet.extend_from_slice(&[0xBE, 0xDE, 0, 0]);
    let (element, len) = &stream.mid_element;
    packet.extend_from_slice(&element[..*len]);
    if let (Some(id), Some(act)) = (stream.abs_capture_time, abs_capture_time) {
        packet.push((id << 4) | (act.len - 1));
        packet.extend_from_slice(&act.bytes[..usize::from(act.len)]);
    }
    let body = packet.len() - start - 4;
    if body == 0 {
        packet.truncate(start);
        return;
    }
    packet.resize(start + 4 + body.div_ceil(4) * 4, 0);
    let words = (body.div_ceil(4)) as u16;
    packet[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
    packet[head] |= 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_end_to_end_extensions_travel_with_a_forwarded_packet() {
        use std::time::{Duration, UNIX_EPOCH};
        let capture = AbsCaptureTime {
            capture_time: UNIX_EPOCH + Duration::from_millis(2_500),
            clock_offset: Some(-7),
        };
        let received = ExtensionValues {
            audio_level: Some(-30),
            voice_activity: Some(true),
            video_orientation: Some(VideoOrientation::Deg90),
            abs_capture_time: Some(capture),
            transport_cc: Some(12),
            abs_send_time: Some(Instant::now()),
            mid: Some(Mid::from("1")),
            rid: Some(Rid::from("h")),
            ..Default::default()
        };
        let written = EndToEnd::of(&received).values();
        assert_eq!(written.audio_level, Some(-30));
        assert_eq!(written.voice_activity, Some(true));
        assert_eq!(written.video_orientation, Some(VideoOrientation::Deg90));
        assert_eq!(written.abs_capture_time, Some(capture));
        // One hop's own: the next hop's session writes its own.
        assert_eq!(written.transport_cc, None);
        assert_eq!(written.abs_send_time, None);
        assert_eq!(written.mid, None);
        assert_eq!(written.rid, None);
        assert_eq!(
            EndToEnd::of(&ExtensionValues::default()),
            EndToEnd::default()
        );
    }

    #[test]
    fn capture_time_is_encoded_once_as_ntp_and_written_after_the_mid() {
        use std::time::{Duration, UNIX_EPOCH};
        let ext = |offset| ExtensionValues {
            abs_capture_time: Some(str0m::rtp::AbsCaptureTime {
                capture_time: UNIX_EPOCH + Duration::from_millis(1_500),
                clock_offset: offset,
            }),
            ..Default::default()
        };
        // 1.5 s after 1970: seconds since 1900 in the high half, one half in the low.
        let ntp = ((1u64 + 2_208_988_800) << 32) | 0x8000_0000;
        let with = CaptureTime::of(&ext(Some(-2))).expect("value");
        assert_eq!(usize::from(with.len), 16);
        assert_eq!(with.bytes[..8], ntp.to_be_bytes());
        assert_eq!(with.bytes[8..], (-2i64).to_be_bytes());
        let without = CaptureTime::of(&ext(None)).expect("value");
        assert_eq!(usize::from(without.len), 8);
        assert_eq!(CaptureTime::of(&ExtensionValues::default()), None);

        let mut mid_element = ([0u8; 17], 2);
        mid_element.0[..2].copy_from_slice(&[(1 << 4), b'7']);
        let stream = EgressStream {
            mid: Mid::from("7"),
            ssrc: 9,
            pt: 96,
            abs_capture_time: Some(3),
            mid_element,
            rtx_pt: None,
        };
        // Behind other bytes (the outbox's buffer): the X bit goes on this packet's header.
        let mut buf = vec![0xAA; 3];
        rtp_header(&mut buf, true, 96, 0x1_0005, 1234, 9);
        write_extensions(&mut buf, 3, &stream, Some(&without));
        assert_eq!(buf[..3], [0xAA; 3]);
        assert_eq!(buf[3], 0x90, "version 2, X set");
        assert_eq!(buf[4], 0x80 | 96);
        assert_eq!(buf[5..7], 5u16.to_be_bytes());
        assert_eq!(buf[15..19], [0xBE, 0xDE, 0, 3], "three words of elements");
        assert_eq!(buf[19..21], [0x10, b'7']);
        assert_eq!(buf[21], (3 << 4) | 7);
        assert_eq!(buf[22..30], ntp.to_be_bytes());
        assert_eq!(buf[30..], [0], "padded to a word");
        // Neither MID nor capture time negotiated: no block, no X bit.
        let bare = EgressStream {
            abs_capture_time: None,
            mid_element: ([0u8; 17], 0),
            ..stream
        };
        let mut buf = Vec::new();
        rtp_header(&mut buf, false, 96, 1, 1, 9);
        write_extensions(&mut buf, 0, &bare, Some(&with));
        assert_eq!((buf.len(), buf[0]), (12, 0x80));
    }
}
