//! Test peers for opencalls (dev-only).
//!
//! [`ClientPeer`] is a plain WebRTC client built on str0m (full ICE, controlling, RTP mode)
//! that talks to the server over real loopback UDP, the way a browser would.
//! [`Api`] is a minimal blocking HTTP/1.1 client for the Calls endpoints, so tests need no
//! HTTP client stack. Everything here is bounded in time: every wait takes a deadline.

pub mod api;
mod client;

pub use api::{Api, Response};
pub use client::{pump, ClientPeer, Received, SenderReportSeen};
