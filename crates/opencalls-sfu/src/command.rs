//! Values crossing the boundary between the control plane and the media workers.
//!
//! Commands use the Calls endpoint verbs. Each carries a reply callback, so this crate
//! needs no async runtime: the control plane passes a closure that completes its future.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::peer::{Kind, Peer};

/// A session inside the media plane (the control plane maps Calls session ids to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(pub u64);

/// One publication (a published track) anywhere in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackKey(pub u64);

static NEXT_TRACK: AtomicU64 = AtomicU64::new(1);
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl TrackKey {
    pub(crate) fn next() -> TrackKey {
        TrackKey(NEXT_TRACK.fetch_add(1, Ordering::Relaxed))
    }
}

impl SessionKey {
    /// A fresh key, unique in the process.
    pub fn next() -> SessionKey {
        SessionKey(NEXT_SESSION.fetch_add(1, Ordering::Relaxed))
    }
}

/// Index of a media worker.
pub type WorkerIndex = usize;

/// Completes a command.
pub type Reply<T> = Box<dyn FnOnce(T) + Send>;

/// Why a whole command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SfuError {
    /// The session is gone (expired, closed, or never existed on this worker).
    #[error("session is gone")]
    SessionGone,
    /// An SFU offer is waiting for its answer; this mutation must wait.
    #[error("an SFU offer is pending; answer it with renegotiate first")]
    OfferPending,
    /// An answer arrived with no SFU offer pending.
    #[error("no SFU offer is pending")]
    NoPendingOffer,
    /// The SDP was unacceptable.
    #[error("invalid session description: {0}")]
    Sdp(String),
    /// The request itself was malformed.
    #[error("{0}")]
    InvalidParams(String),
    /// A bug or a crash inside the session; the session was closed.
    #[error("internal error")]
    Internal,
}

/// Why one item of a batch failed (the rest of the batch still succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemError {
    /// The publication does not exist.
    TrackNotFound,
    /// The mid is not an m-line of the offer that this session receives on.
    MidNotFound(String),
    /// The track name is already published from another m-line of this session.
    RepeatedTrackName,
    /// Closing something that is absent or already closed.
    AlreadyClosed,
    /// The mid is not a pulled track of this session, or the new source does not fit it.
    NotUpdatable(String),
    /// The session could not do it.
    Internal,
}

/// A local track (publish) item: the client offer's `mid` carries `track_name`.
#[derive(Debug, Clone)]
pub struct PushItem {
    /// Mid in the client's offer.
    pub mid: String,
    /// Name other sessions pull it by.
    pub track_name: String,
}

/// A successfully published track.
#[derive(Debug, Clone)]
pub struct Published {
    /// Mid in this session.
    pub mid: String,
    /// Track name.
    pub track_name: String,
    /// Process-wide key of the publication.
    pub key: TrackKey,
    /// Audio or video.
    pub kind: Kind,
}

/// What a push (client offer) did.
#[derive(Debug)]
pub struct PushOutcome {
    /// Our SDP answer.
    pub answer: String,
    /// One entry per requested item (or per discovered m-line with autoDiscover).
    pub tracks: Vec<Result<Published, (String, ItemError)>>,
}

/// A remote track (subscribe) item, resolved by the control plane.
#[derive(Debug, Clone)]
pub struct PullItem {
    /// The publication.
    pub source: TrackKey,
    /// Worker that owns the publisher.
    pub source_worker: WorkerIndex,
    /// Audio or video.
    pub kind: Kind,
    /// Publisher's Calls session id.
    pub source_session_id: String,
    /// Publication's track name.
    pub track_name: String,
    /// Simulcast layer to forward (`simulcast.preferredRid`); default: the first seen.
    pub preferred_rid: Option<String>,
    /// `mid: "#name"`: send on the existing sendrecv m-line of this session's local track
    /// `name` instead of adding an m-line.
    pub onto: Option<String>,
}

/// A local track published without a client offer: the SFU offers an m-line for it.
#[derive(Debug, Clone)]
pub struct PublishItem {
    /// Name other sessions pull it by.
    pub track_name: String,
    /// Audio or video.
    pub kind: Kind,
    /// `bidirectionalMediaStream`: a sendrecv m-line that can later carry a pulled track.
    pub bidirectional: bool,
}

/// What a pull did.
#[derive(Debug)]
pub struct PullOutcome {
    /// The SFU offer (None when no item could be added).
    pub offer: Option<String>,
    /// The new mid per item, in request order.
    pub mids: Vec<Result<String, ItemError>>,
}

/// A `tracks/update` item: re-point a pulled m-line and/or change its simulcast layer.
#[derive(Debug, Clone)]
pub struct UpdateItem {
    /// Mid of a pulled track in this session.
    pub mid: String,
    /// New publication to feed it (resolved by the control plane), if any.
    pub source: Option<PullItem>,
    /// New preferred simulcast layer, if any.
    pub preferred_rid: Option<String>,
}

/// What an update did to one item: the (possibly new) source it now pulls.
#[derive(Debug, Clone)]
pub struct Updated {
    /// Publisher session.
    pub source_session_id: String,
    /// Publication name.
    pub track_name: String,
}

/// What a close did.
#[derive(Debug)]
pub struct CloseOutcome {
    /// Answer to the client's offer, if it sent one.
    pub answer: Option<String>,
    /// Per mid, in request order.
    pub results: Vec<Result<(), ItemError>>,
    /// Track names this session no longer publishes.
    pub unpublished: Vec<String>,
}

/// One track of a session, for `GET sessions/{id}`.
#[derive(Debug, Clone)]
pub struct TrackState {
    /// Published (true) or pulled (false).
    pub local: bool,
    /// Mid in this session.
    pub mid: String,
    /// Track name.
    pub track_name: String,
    /// Publisher session (pulled tracks).
    pub source_session_id: Option<String>,
    /// Still open.
    pub active: bool,
}

/// A request from the control plane to the worker that owns a session.
pub enum Command {
    /// Install a new session (peer built off the media thread); answer `offer` if given.
    AddSession {
        /// New key.
        key: SessionKey,
        /// Calls session id.
        session_id: String,
        /// The prepared peer.
        peer: Box<Peer>,
        /// Optional client offer to answer right away.
        offer: Option<String>,
        /// Gets the answer, if an offer was given.
        reply: Reply<Result<Option<String>, SfuError>>,
    },
    /// `tracks/new` with a client offer and local tracks (or autoDiscover).
    Push {
        /// Session.
        key: SessionKey,
        /// Client offer.
        offer: String,
        /// Items.
        items: Vec<PushItem>,
        /// Publish every receiving m-line not yet published.
        auto_discover: bool,
        /// Gets the outcome.
        reply: Reply<Result<PushOutcome, SfuError>>,
    },
    /// `tracks/new` with remote tracks and no offer.
    Pull {
        /// Session.
        key: SessionKey,
        /// Items; `Err` items were resolved as failures by the control plane.
        items: Vec<Result<PullItem, ItemError>>,
        /// Gets the outcome.
        reply: Reply<Result<PullOutcome, SfuError>>,
    },
    /// `tracks/new` with local tracks and no offer: the SFU offers their m-lines.
    Publish {
        /// Session.
        key: SessionKey,
        /// Items.
        items: Vec<PublishItem>,
        /// The SFU offer and the new mid per item.
        reply: Reply<Result<PullOutcome, SfuError>>,
    },
    /// `tracks/update`.
    Update {
        /// Session.
        key: SessionKey,
        /// Items.
        items: Vec<Result<UpdateItem, ItemError>>,
        /// Per item, in request order.
        reply: Reply<Result<Vec<Result<Updated, ItemError>>, SfuError>>,
    },
    /// `renegotiate`.
    Answer {
        /// Session.
        key: SessionKey,
        /// Client answer.
        sdp: String,
        /// Tracks published by this answer (offered with `Publish`).
        reply: Reply<Result<Vec<Published>, SfuError>>,
    },
    /// `tracks/close`.
    Close {
        /// Session.
        key: SessionKey,
        /// Mids of this session.
        mids: Vec<String>,
        /// Client offer (negotiated close).
        offer: Option<String>,
        /// Gets the outcome.
        reply: Reply<Result<CloseOutcome, SfuError>>,
    },
    /// Test-only: panic inside this session's peer handling.
    #[cfg(feature = "fault-injection")]
    InjectPanic {
        /// Session.
        key: SessionKey,
    },
    /// `GET sessions/{id}`.
    Get {
        /// Session.
        key: SessionKey,
        /// Gets the tracks.
        reply: Reply<Result<Vec<TrackState>, SfuError>>,
    },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Command::AddSession { .. } => "AddSession",
            Command::Push { .. } => "Push",
            Command::Pull { .. } => "Pull",
            Command::Answer { .. } => "Answer",
            Command::Update { .. } => "Update",
            Command::Publish { .. } => "Publish",
            Command::Close { .. } => "Close",
            Command::Get { .. } => "Get",
            #[cfg(feature = "fault-injection")]
            Command::InjectPanic { .. } => "InjectPanic",
        };
        f.write_str(name)
    }
}

/// What the media plane tells the control plane on its own initiative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// A session ended (expired before connecting, lost its peer, or crashed).
    SessionClosed {
        /// Session.
        key: SessionKey,
        /// Why.
        reason: CloseReason,
    },
    /// A publication ended without a `tracks/close` (no media for too long).
    PublicationClosed {
        /// Publisher.
        key: SessionKey,
        /// Its track name.
        track_name: String,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Never connected in time.
    NeverConnected,
    /// Connectivity lost for too long.
    Disconnected,
    /// A panic inside the session.
    Crashed,
    /// The server is shutting down.
    Shutdown,
}
