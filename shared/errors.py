"""One error hierarchy for the whole service.

Each error knows its HTTP status, its stable `code`, and whether it is transient
(worth retrying later by the host or the caller). The status lives on the class: the
classes here and the few subclasses kept next to the code that raises them
(`blob_job.InvalidTaskConfig`, `InvalidBlobName`, `ManifestIncomplete`,
`model.ResponseFormatRejected`). They become HTTP responses in one place
(`http_api.error_response`) and blob records in one place (`blob_job.blob_record`). The
Functions host answers some requests itself before our code runs (routing, auth, its own
body limits); those statuses are not decided here.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any


class VlmError(Exception):
    """Base class. Subclasses set `status`, `code` and `transient`."""

    status: int = 500
    code: str = "internal_error"
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: {"error": {"code", "message", "details"}}."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ConfigurationError(VlmError):
    """A setting is missing or malformed: an operator must fix the app settings."""

    status = 500
    code = "configuration_error"


class InternalError(VlmError):
    """A bug or an unforeseen failure: the caller gets only an `error_id`, the log gets the traceback."""

    status = 500
    code = "internal_error"

    @classmethod
    def logged(cls, log: logging.Logger, context: str) -> InternalError:
        """Call inside an `except` block: logs the traceback under a new error id and returns the
        error to answer with (no exception text reaches the caller)."""
        error_id = secrets.token_hex(6)
        log.exception("%s (error_id=%s)", context, error_id)
        return cls(f"unexpected error; quote error_id {error_id} when reporting it", details={"error_id": error_id})


# --- caller errors (4xx, permanent) -------------------------------------------------


class InvalidRequest(VlmError):
    status = 400
    code = "invalid_request"


class InvalidSchema(VlmError):
    status = 400
    code = "invalid_schema"


class TooManyPixels(VlmError):
    status = 400
    code = "too_many_pixels"


class ImageTooLarge(VlmError):
    status = 413
    code = "image_too_large"


class UnsupportedMediaType(VlmError):
    status = 415
    code = "unsupported_media_type"


class ContentFiltered(VlmError):
    status = 422
    code = "content_filtered"


class ModelOutputInvalid(VlmError):
    status = 422
    code = "model_output_invalid"


class OutputTruncated(VlmError):
    status = 422
    code = "output_truncated"


class Refused(VlmError):
    status = 422
    code = "refused"


class DeploymentUnavailable(VlmError):
    """A deployment does not exist or runs a retired model version: an operator must act; retrying cannot help."""

    status = 503
    code = "deployment_unavailable"


# --- upstream errors (transient) ----------------------------------------------------


class UpstreamThrottled(VlmError):
    status = 429
    code = "upstream_throttled"
    transient = True


class UpstreamError(VlmError):
    status = 502
    code = "upstream_error"
    transient = True


class UpstreamUnavailable(VlmError):
    status = 503
    code = "upstream_unavailable"
    transient = True


class UpstreamTimeout(VlmError):
    status = 504
    code = "upstream_timeout"
    transient = True


ALL_ERRORS: tuple[type[VlmError], ...] = (
    ConfigurationError,
    InternalError,
    InvalidRequest,
    InvalidSchema,
    TooManyPixels,
    ImageTooLarge,
    UnsupportedMediaType,
    ContentFiltered,
    ModelOutputInvalid,
    OutputTruncated,
    Refused,
    DeploymentUnavailable,
    UpstreamThrottled,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamTimeout,
)
