//! `ApiError`: the one type that knows HTTP statuses and Calls error codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use opencalls_api::{ErrorBody, ErrorCode, BACKEND_ERROR_DESCRIPTION};
use opencalls_sfu::SfuError;

/// A request-level failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    description: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, description: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            description: description.into(),
            retry_after: None,
        }
    }

    /// 401.
    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "Unauthorized",
        )
    }

    /// 404 for an unknown app, session or path.
    pub fn not_found(what: &str) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("{what} not found"),
        )
    }

    /// 400: not JSON, or not the expected shape.
    pub fn decoding(description: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::DecodingError,
            description,
        )
    }

    /// 406: fields that make no sense together.
    pub fn invalid_params(description: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            ErrorCode::InvalidParams,
            description,
        )
    }

    /// 406: SDP problems and negotiation out of order.
    pub fn invalid_sdp(description: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            ErrorCode::InvalidSessionDescription,
            description,
        )
    }

    /// 413.
    pub fn payload_too_large() -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "Request body too large",
        )
    }

    /// 410: the session expired or was closed.
    pub fn session_gone() -> ApiError {
        Self::new(
            StatusCode::GONE,
            ErrorCode::SessionError,
            "Session is closed or expired",
        )
    }

    /// 429: over Calls' 50 requests per second per session; clients retry.
    pub fn rate_limited() -> ApiError {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RetryableTransientError,
            "Too many requests for this session (limit: 50 per second)",
        )
    }

    /// 500.
    pub fn internal() -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            BACKEND_ERROR_DESCRIPTION,
        )
    }

    /// 503: the media plane is not answering.
    pub fn unavailable() -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::TemporarilyUnavailableError,
            "Media plane unavailable",
        )
    }
}

impl ApiError {
    /// 503 with `Retry-After`: no media worker has room for a new session (each is
    /// saturated or at its load limit).
    pub fn overloaded() -> ApiError {
        ApiError {
            retry_after: Some(OVERLOAD_RETRY_AFTER_SECS),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::TemporarilyUnavailableError,
                "No media worker has room for a new session; retry later",
            )
        }
    }
}

/// How long a client refused for load waits: about the time the load figure takes to
/// follow a change (`opencalls_sfu::load`).
const OVERLOAD_RETRY_AFTER_SECS: u32 = 2;

impl From<SfuError> for ApiError {
    fn from(e: SfuError) -> ApiError {
        match e {
            SfuError::SessionGone => ApiError::session_gone(),
            SfuError::OfferPending | SfuError::NoPendingOffer | SfuError::Sdp(_) => {
                ApiError::invalid_sdp(e.to_string())
            }
            SfuError::InvalidParams(s) => ApiError::invalid_params(s),
            SfuError::Internal => ApiError::internal(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error_code: self.code,
            error_description: self.description,
        };
        let mut res = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
