"""Errors an ``ApiBackend`` raises; each knows its HTTP status and its error code.

The routes turn any ``ApiError`` into ``ErrorResponse(error=code, detail=str(exc))`` with
``status`` - except ``ConcurrencyLimitReached``, answered with FastRTC's 429 body.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ApiError",
    "ConcurrencyLimitReached",
    "DownloadInProgress",
    "InvalidParameters",
    "InvalidSdp",
    "NoPipelineLoaded",
    "OutOfResources",
    "UnknownPipeline",
    "UnknownSession",
]


class ApiError(Exception):
    """Base class: a request the backend refuses, with the reason in the message."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"


class ConcurrencyLimitReached(ApiError):
    """An offer would exceed the number of concurrent sessions."""

    status = 429
    code = "concurrency_limit_reached"

    def __init__(self, limit: int) -> None:
        super().__init__(f"concurrency limit of {limit} sessions reached")
        self.limit = limit


class OutOfResources(ApiError):
    """The request is fine but the server has no room for it now (shared memory for a
    session's frames): 503, try again later or elsewhere."""

    status = 503
    code = "out_of_resources"


class NoPipelineLoaded(ApiError):
    """An offer arrived while no pipeline is loaded (not loaded, still loading, or failed).

    400, as Scope answers (``"Pipeline not loaded. Please load pipeline first."``): Scope clients
    already treat that answer as "load first", and nothing is gained by a different code.
    """

    status = 400
    code = "pipeline_not_loaded"

    def __init__(self, detail: str = "Pipeline not loaded. Please load pipeline first.") -> None:
        super().__init__(detail)


class InvalidSdp(ApiError):
    """The offer's SDP could not be used (unparsable, no usable media, wrong type)."""

    status = 400
    code = "invalid_sdp"


class InvalidParameters(ApiError):
    """Load parameters or ``initialParameters`` do not satisfy the pipeline's schema."""

    status = 400
    code = "invalid_parameters"


class UnknownSession(ApiError):
    """No session has this id (never existed, or already closed)."""

    status = 404
    code = "unknown_session"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} not found")
        self.session_id = session_id


class UnknownPipeline(ApiError):
    """No pipeline is registered under this id."""

    status = 404
    code = "unknown_pipeline"

    def __init__(self, pipeline_id: str) -> None:
        super().__init__(f"Unknown pipeline {pipeline_id!r}")
        self.pipeline_id = pipeline_id


class DownloadInProgress(ApiError):
    """A model download for this pipeline is already running (409, as Scope)."""

    status = 409
    code = "download_in_progress"

    def __init__(self, pipeline_id: str) -> None:
        super().__init__(f"Download already in progress for {pipeline_id}")
        self.pipeline_id = pipeline_id


class BadRequest(ApiError):
    """A body or query that does not have the shape the route takes (names the field)."""

    status = 400
    code = "invalid_request"


class MalformedJson(ApiError):
    status = 400
    code = "invalid_json"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class NotSupported(ApiError):
    """A Scope feature dreamwire does not have: the request is fine, this server cannot do it
    (4xx, so clients show the reason instead of reporting a server fault)."""

    status = 400
    code = "not_supported"
