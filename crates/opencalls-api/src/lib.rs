//! The Cloudflare Calls (Realtime SFU) HTTPS API wire format.
//!
//! Request and response bodies with the exact field names of the Calls API, and the
//! `errorCode` strings it uses. This crate knows nothing about WebRTC, str0m or HTTP
//! status codes: those live in `opencalls-sfu` and `opencalls-server`.
#![warn(missing_docs)]

mod error;
mod types;

pub use error::{ErrorBody, ErrorCode};
pub use types::*;

/// Most tracks one `tracks/new` or `tracks/close` request may carry (calls-api.md §8).
pub const MAX_TRACKS_PER_REQUEST: usize = 64;
