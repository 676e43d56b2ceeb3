//! Calls `errorCode` values and the `{errorCode, errorDescription}` envelope.

use serde::Serialize;

/// Every `errorCode` opencalls emits, spelled as the Calls API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Bad or missing bearer secret.
    Unauthorized,
    /// Unknown app, session or path.
    NotFound,
    /// Body is not JSON or has the wrong shape.
    DecodingError,
    /// A field or a combination of fields is not acceptable.
    InvalidParams,
    /// Body over the size limit.
    PayloadTooLarge,
    /// The session expired or was closed (410).
    SessionError,
    /// Unacceptable SDP, or an offer/answer out of order.
    InvalidSessionDescription,
    /// Per item: the publication does not exist.
    NotFoundTrackError,
    /// Per item: closing a track that does not exist or is already closed.
    CloseTrackError,
    /// Per item: a local track name that is already published in this session.
    RepeatedLocalTrackError,
    /// Per item: the track cannot be updated as asked.
    UpdateTrackError,
    /// Service-side failure.
    InternalError,
    /// The media plane cannot take the request right now.
    TemporarilyUnavailableError,
    /// A transient condition (e.g. the per-session request rate); retry.
    RetryableTransientError,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::DecodingError => "decoding_error",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::SessionError => "session_error",
            ErrorCode::InvalidSessionDescription => "invalid_session_description",
            ErrorCode::NotFoundTrackError => "not_found_track_error",
            ErrorCode::CloseTrackError => "close_track_error",
            ErrorCode::RepeatedLocalTrackError => "repeated_local_track_error",
            ErrorCode::UpdateTrackError => "update_track_error",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::TemporarilyUnavailableError => "temporarily_unavailable_error",
            ErrorCode::RetryableTransientError => "retryable_transient_error",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The top-level error body: `{"errorCode": "...", "errorDescription": "..."}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Machine-readable code.
    pub error_code: ErrorCode,
    /// Human-readable text.
    pub error_description: String,
}

/// Description Calls uses for closing an absent or already closed track.
pub const CLOSE_TRACK_DESCRIPTION: &str = "Track doesn't exist or was already closed";
/// Description Calls uses for backend failures.
pub const BACKEND_ERROR_DESCRIPTION: &str = "Backend error";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_calls_field_names() {
        let body = ErrorBody {
            error_code: ErrorCode::NotFoundTrackError,
            error_description: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"errorCode":"not_found_track_error","errorDescription":"x"}"#
        );
    }
}
