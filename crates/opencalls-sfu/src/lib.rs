//! The opencalls media plane: sessions, tracks, forwarding and the media worker threads.
//!
//! This is the only crate that imports str0m, and inside it only [`peer`] calls str0m's
//! API (plus the header-extension value type the forwarder copies). It knows nothing of
//! HTTP, JSON or the Calls wire format; the control plane speaks to it with
//! [`command::Command`] values and hears back through [`command::MediaEvent`]s.
#![warn(missing_docs)]

mod batch;
pub mod command;
pub mod delay;
pub mod forward;
pub mod load;
pub mod peer;
mod session;
pub mod stun;
mod timers;
pub mod udp;
pub mod worker;

pub use command::*;
pub use delay::DelayHistogram;
pub use peer::{
    crypto_provider, select_aes_gcm, AesGcm, AesGcmChoice, Certificate, IngressPath, Kind, Peer,
    PeerConfig,
};
pub use worker::{
    random_hex, Endpoint, MediaConfig, MediaPlane, Timeouts, WorkerHandle, WorkerStats,
};
