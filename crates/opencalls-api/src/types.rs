//! Request and response bodies (calls-api.md §2, §4).
//!
//! Optional fields are skipped when absent so responses carry exactly the fields Calls
//! sends. Unknown request fields are ignored, as Calls does.

use serde::{Deserialize, Serialize};

pub use crate::error::{BACKEND_ERROR_DESCRIPTION, CLOSE_TRACK_DESCRIPTION};
use crate::ErrorCode;

/// `{type, sdp}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDescription {
    /// `"offer"` or `"answer"`.
    #[serde(rename = "type")]
    pub kind: SdpType,
    /// The SDP text.
    pub sdp: String,
}

/// Offer or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpType {
    /// An offer.
    Offer,
    /// An answer.
    Answer,
}

/// `local` (publish) or `remote` (subscribe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// Media this session sends to the SFU.
    Local,
    /// Media another session published, received by this one.
    Remote,
}

/// Simulcast preferences of a pulled track (accepted and echoed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SimulcastPrefs {
    /// Layer to forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_rid: Option<String>,
    /// `none` or `asciibetical`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_ordering: Option<String>,
    /// `none` or `asciibetical`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rid_not_available: Option<String>,
}

/// `TrackObject` in requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackObject {
    /// Publish or subscribe.
    pub location: Option<Location>,
    /// Transceiver mid in this session.
    pub mid: Option<String>,
    /// Publisher session (remote only).
    pub session_id: Option<String>,
    /// Track name.
    pub track_name: Option<String>,
    /// Ask for a sendrecv transceiver.
    pub bidirectional_media_stream: Option<bool>,
    /// `audio` or `video`.
    pub kind: Option<String>,
    /// Simulcast preferences.
    pub simulcast: Option<SimulcastPrefs>,
}

/// `TrackResult`: what a track item answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackResult {
    /// Echoed in GET.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Transceiver mid in this session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
    /// Publisher session (remote).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Track name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_name: Option<String>,
    /// Simulcast echo.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulcast: Option<SimulcastPrefs>,
    /// GET only: `active` or `inactive`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    /// Per-item failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
    /// Per-item failure text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

impl TrackResult {
    /// Marks this item as failed.
    pub fn with_error(mut self, code: ErrorCode, description: impl Into<String>) -> Self {
        self.error_code = Some(code);
        self.error_description = Some(description.into());
        self
    }
}

/// `POST sessions/new` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSessionRequest {
    /// Optional client offer (the original flow).
    pub session_description: Option<SessionDescription>,
}

/// `POST sessions/new` answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSessionResponse {
    /// 32 lowercase hex characters.
    pub session_id: String,
    /// Answer to the offer, when one was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_description: Option<SessionDescription>,
}

/// `POST tracks/new` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracksRequest {
    /// Client offer.
    pub session_description: Option<SessionDescription>,
    /// Tracks to publish or pull.
    pub tracks: Option<Vec<TrackObject>>,
    /// Publish every new m-line of the offer.
    pub auto_discover: Option<bool>,
}

/// `POST tracks/new` and `PUT tracks/close` answer.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracksResponse {
    /// True iff `sessionDescription` is an SFU offer.
    pub requires_immediate_renegotiation: bool,
    /// Answer or SFU offer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_description: Option<SessionDescription>,
    /// One result per requested track.
    pub tracks: Vec<TrackResult>,
}

/// `PUT tracks/update` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateTracksRequest {
    /// Pulled tracks to re-point or re-layer, by this session's mid.
    pub tracks: Vec<TrackObject>,
}

/// `PUT renegotiate` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenegotiateRequest {
    /// The client's answer to the pending SFU offer.
    pub session_description: SessionDescription,
}

/// `{mid}` in a close request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloseTrackObject {
    /// Mid in this session.
    pub mid: String,
}

/// `PUT tracks/close` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloseTracksRequest {
    /// Mids to close.
    pub tracks: Vec<CloseTrackObject>,
    /// Client offer with the transceivers stopped (negotiated close).
    pub session_description: Option<SessionDescription>,
    /// Close without SDP.
    #[serde(default)]
    pub force: bool,
}

/// `GET sessions/{id}` answer.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GetSessionStateResponse {
    /// Every track the session has had, with its status.
    pub tracks: Vec<TrackResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_result_echoes_session_track_and_mid_only() {
        let r = TrackResult {
            mid: Some("3".into()),
            session_id: Some("ab".into()),
            track_name: Some("t".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"mid":"3","sessionId":"ab","trackName":"t"}"#
        );
    }

    #[test]
    fn track_object_accepts_unknown_fields_and_fallback_strategy() {
        let t: TrackObject = serde_json::from_str(
            r#"{"location":"remote","sessionId":"a","trackName":"b","simulcast":{"preferredRid":"h","fallbackStrategy":"auto"},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(t.location, Some(Location::Remote));
        assert_eq!(t.simulcast.unwrap().preferred_rid.as_deref(), Some("h"));
    }

    #[test]
    fn sdp_type_is_lowercase() {
        let d: SessionDescription =
            serde_json::from_str(r#"{"type":"offer","sdp":"v=0"}"#).unwrap();
        assert_eq!(d.kind, SdpType::Offer);
        assert!(
            serde_json::from_str::<SessionDescription>(r#"{"type":"pranswer","sdp":""}"#).is_err()
        );
    }
}
