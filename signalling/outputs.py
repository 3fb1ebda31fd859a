"""``GET /api/v1/sessions/{id}/outputs``: a session's results as server-sent events.

The same messages the client gets on its data channel (``fetch_output`` with Moondream's
captions, answers, boxes and points; ``error``), for apps that want the data without reading
pixels or holding the WebRTC connection. The stream ends when the session does.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from signalling.connections import event_stream_slot
from signalling.sessions import PeerSession, SessionManager

LISTENER_QUEUE = 64
KEEPALIVE_S = 15.0

sessions_key = web.AppKey("output_sessions", SessionManager)


async def session_outputs(request: web.Request) -> web.StreamResponse:
    sessions = request.app[sessions_key]
    session_id = request.match_info["session_id"]
    session = sessions.sessions.get(session_id)
    if session is None:
        return web.json_response(
            {"error": "unknown_session", "detail": f"Unknown session {session_id!r}"}, status=404
        )
    with event_stream_slot(request):
        return await _stream_outputs(request, session)


async def _stream_outputs(request: web.Request, session: PeerSession) -> web.StreamResponse:
    queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(LISTENER_QUEUE)
    session.output_listeners.add(queue)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if message is None:
                break
            event = str(message.get("type", "message"))
            data = json.dumps(message.get("data"))
            await response.write(f"event: {event}\ndata: {data}\n\n".encode())
    except ConnectionResetError:
        pass  # the listener went away
    finally:
        session.output_listeners.discard(queue)
    return response


def add_output_routes(app: web.Application, sessions: SessionManager) -> None:
    app[sessions_key] = sessions
    app.router.add_get("/api/v1/sessions/{session_id}/outputs", session_outputs)
