"""Scope's recording routes over :mod:`signalling.recordings`.

* ``POST /api/v1/recordings/{session_id}/start`` and ``…/stop`` (Scope 0.2, ``?node_id=`` from
  its record node: dreamwire records the session's output, whichever node asks):
  ``{"status": "started" | "already_recording"}``, ``{"status": "stopped" | "not_recording"}``;
* ``GET /api/v1/recordings/{session_id}`` (0.1 and 0.2): the recording as an attachment,
  ``recording-YYYYmmdd_HHMMSS.mp4`` (H.264) or ``.webm`` (VP8).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import msgspec
from aiohttp import web

from services import topology
from signalling.api.errors import ApiError, InvalidParameters, NotSupported, UnknownSession
from signalling.api.openapi import Operation, QueryParam, Resp
from signalling.api.state import guarded, json_response
from signalling.api.types import ErrorResponse
from signalling.recordings import RecordingRefused, Recordings, download_name
from signalling.sessions import PeerSession, SessionManager

logger = logging.getLogger(__name__)

recordings_key = web.AppKey("recordings", Recordings)
recording_sessions_key = web.AppKey("recording_sessions", SessionManager)
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}


class NoRoomToRecord(ApiError):
    """The disk or the recordings' budget is full."""

    status = 507
    code = "insufficient_storage"


class NoRecording(ApiError):
    status = 404
    code = "recording_not_found"


class RecordingStatus(msgspec.Struct):
    status: Literal["started", "already_recording", "stopped", "not_recording"]


def _live(request: web.Request) -> PeerSession | None:
    return request.app[recording_sessions_key].sessions.get(request.match_info["session_id"])


def start_recording(recordings: Recordings, session: PeerSession) -> bool:
    """Start recording a live session (False: it already is)."""
    if session.stage(topology.ENCODE) != topology.ENCODE:
        raise NotSupported(
            f"session {session.session_id} runs on a media node: recordings are made on this "
            "server's own encode stage"
        )
    try:
        return recordings.start(session.session_id, session.codec)
    except RecordingRefused as exc:
        raise NoRoomToRecord(str(exc)) from None


def _check_node(request: web.Request, session: PeerSession | None) -> None:
    """``?node_id=`` names one of the session's graph record nodes (Scope's rule)."""
    node_id = request.query.get("node_id")
    if node_id is None or session is None or node_id in session.record_nodes:
        return
    if not session.record_nodes:
        raise InvalidParameters("node_id: this session has no graph record nodes; omit node_id")
    raise InvalidParameters(
        f"node_id: {node_id!r} is not a record node of this session "
        f"({', '.join(sorted(session.record_nodes))})"
    )


@guarded
async def recording_start(request: web.Request) -> web.StreamResponse:
    session = _live(request)
    if session is None:
        raise UnknownSession(request.match_info["session_id"])
    _check_node(request, session)
    started = start_recording(request.app[recordings_key], session)
    return json_response(RecordingStatus("started" if started else "already_recording"))


@guarded
async def recording_stop(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    recordings = request.app[recordings_key]
    session = _live(request)
    if session is None and not recordings.recording(session_id):
        raise UnknownSession(session_id)
    _check_node(request, session)
    try:
        stopped = await recordings.stop(session_id)
    except (TimeoutError, RecordingRefused) as exc:
        raise NoRecording(f"the recording of session {session_id} was lost: {exc}") from None
    return json_response(RecordingStatus("stopped" if stopped else "not_recording"))


@guarded
async def recording_download(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    try:
        found = await request.app[recordings_key].download(
            session_id, live=_live(request) is not None
        )
    except (TimeoutError, asyncio.CancelledError, RecordingRefused) as exc:
        raise NoRecording(f"the recording of session {session_id} was lost: {exc}") from None
    if found is None or not found.path.is_file():
        raise NoRecording(f"no recording of session {session_id}")
    return web.FileResponse(
        found.path,
        headers={
            "Content-Type": MEDIA_TYPES.get(found.path.suffix, "application/octet-stream"),
            "Content-Disposition": f'attachment; filename="{download_name(found)}"',
        },
    )


def recording_operations() -> list[Operation]:
    node = QueryParam(
        "node_id", "Scope 0.2's record node (the session's output is recorded)", required=False
    )
    status = {
        200: Resp("What happened", RecordingStatus),
        404: Resp("No such session", ErrorResponse),
    }
    return [
        Operation(
            "POST",
            "/api/v1/recordings/{session_id}/start",
            recording_start,
            "Record the session's output (the packets the client receives, no second encode)",
            "recordings",
            responses={**status, 507: Resp("No room on the disk or in the budget", ErrorResponse)},
            query=(node,),
        ),
        Operation(
            "POST",
            "/api/v1/recordings/{session_id}/stop",
            recording_stop,
            "Stop recording; returns once the file is complete",
            "recordings",
            responses=status,
            query=(node,),
        ),
        Operation(
            "GET",
            "/api/v1/recordings/{session_id}",
            recording_download,
            "The recording (while recording: the file so far; recording goes on in the next)",
            "recordings",
            responses={
                200: Resp("MP4 (H.264) or WebM (VP8), as an attachment", None, "video/mp4"),
                404: Resp("No recording of this session", ErrorResponse),
            },
        ),
    ]  # fmt: skip


def add_recording_routes(
    app: web.Application, recordings: Recordings, sessions: SessionManager
) -> None:
    """The handlers' state; the routes themselves are added with the API's (documented)."""
    app[recordings_key] = recordings
    app[recording_sessions_key] = sessions
