"""The aiohttp application of the signalling process: the Scope API on the real backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import assert_never

import msgspec
from aiohttp import web

from services import protocol as p
from services import topology
from services.inference.catalog import PipelineCatalog
from services.models.store import resolve_models_dir
from services.runtime import ServiceSpec, log_file
from signalling.api import StudioState, add_api_routes
from signalling.api.hosts import host_middleware
from signalling.backend import SignallingBackend
from signalling.connections import ConnectionGuard, StreamCap, stream_cap_key
from signalling.control import ControlLink
from signalling.dreams.launcher import SupervisedWorker
from signalling.dreams.routes import add_dreams_routes
from signalling.links import AdminLink, AsyncOutbox
from signalling.metrics_routes import add_metrics_routes
from signalling.models import ModelsLink
from signalling.options import SignallingOptions
from signalling.outputs import add_output_routes
from signalling.recording_routes import add_recording_routes, recording_operations
from signalling.recordings import Recordings
from signalling.sessions import SessionManager

logger = logging.getLogger(__name__)

backend_key = web.AppKey("backend", SignallingBackend)
guard_key = web.AppKey("connections", ConnectionGuard)


STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Stages report drops one at a time; a larger count is a bad message, not a metric.
MAX_DROP_REPORT = 1000


#: How often kept recordings are looked at (deleted past their time or the budget).
RECORDINGS_SWEEP_S = 30.0


async def sweep_recordings(recordings: Recordings) -> None:
    while True:
        await asyncio.sleep(RECORDINGS_SWEEP_S)
        recordings.sweep()


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.FileResponse:
    # Browsers ask every page of the origin for it: a 404 is an error in their console.
    return web.FileResponse(STATIC_DIR / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


def recordings_dir(options: SignallingOptions, run_dir: Path) -> Path:
    configured = options.recording.dir
    return Path(configured).expanduser() if configured else run_dir / "recordings"


def add_page_routes(app: web.Application) -> None:
    """The web page at ``/``: plain HTML, CSS and JavaScript modules, no build step."""
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static/", STATIC_DIR, append_version=True)


def create_app(spec: ServiceSpec, control: ControlLink) -> web.Application:
    options = msgspec.convert(spec.options, SignallingOptions)
    api_config = options.api
    admin = AdminLink(control.ctx, spec.run_dir)
    outbox = AsyncOutbox(control.ctx, spec.run_dir)
    catalog = PipelineCatalog()
    models = ModelsLink(resolve_models_dir(options.models_dir))
    sessions = SessionManager(
        outbox,
        catalog,
        admin,
        connect_timeout_s=options.connect_timeout_s,
        video_codec=api_config.video_codec,
    )
    guard = ConnectionGuard(api_config.connections)
    recordings = Recordings(
        options.recording,
        recordings_dir(options, Path(spec.run_dir)),
        lambda session_id, command: sessions.outbox.send(sessions.encode_of(session_id), command),
    )
    backend = SignallingBackend(
        admin,
        sessions,
        catalog,
        models,
        max_sessions=options.max_sessions,
        connections=guard,
        recordings=recordings,
    )

    async def on_inbox(msg: p.SignallingInbox) -> None:
        match msg:
            case p.EncodedPacket():
                sessions.on_packet(msg)
                control.frames_done += 1
            case p.KeyframeNeeded(session_id=session_id):
                await sessions.on_keyframe_needed(session_id)
            case p.StageOutput():
                sessions.on_stage_output(msg)
            case p.RecordingFinished():
                if (notice := recordings.finished(msg)) and msg.session_id in sessions.sessions:
                    sessions.sessions[msg.session_id].send_message(
                        {"type": "warning", "data": notice}
                    )
            case p.FramesDropped(session_id=session_id, stage=stage, count=count):
                if stage not in topology.MEDIA_KINDS or not 0 < count <= MAX_DROP_REPORT:
                    raise ValueError(f"drops: {count} at {stage!r} is not a drop report")
                sessions.metrics.dropped(session_id, stage, count)
            case _:
                assert_never(msg)

    control.on_inbox = on_inbox

    async def on_session_failed(msg: p.SessionFailed) -> None:
        if topology.StageAddress.parse(msg.service).process == topology.ENCODE:
            recordings.encode_lost(msg.session_id)
        await sessions.stage_failed(msg)

    control.on_session_failed = on_session_failed
    control.session_count = lambda: len(sessions)

    app = web.Application(client_max_size=api_config.max_body_bytes)
    app[backend_key] = backend
    app[guard_key] = guard
    app[stream_cap_key] = StreamCap()
    app.middlewares.append(guard.middleware)  # the outermost: it sees every request
    app.middlewares.append(host_middleware(options.host, api_config.allowed_hosts))
    studio = StudioState(
        home=Path(options.home) if options.home else None,
        models_dir=models.models_dir,
        log_file=log_file(spec.run_dir),
    )
    add_api_routes(app, backend, api_config, studio=studio, extra=recording_operations())
    add_recording_routes(app, recordings, sessions)
    add_page_routes(app)
    add_output_routes(app, sessions)
    dreams_config = options.dreams
    hub = add_dreams_routes(app, dreams_config, supervisor=admin)
    if isinstance(hub.launcher, SupervisedWorker):
        control.on_worker_exited = hub.launcher.exited
    add_metrics_routes(app, sessions.metrics, admin.status)  # /api/v1/metrics, /metrics

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(guard.run_sweeper(), name="connections.sweep")
        kept = asyncio.create_task(sweep_recordings(recordings), name="recordings.sweep")
        yield
        sweeper.cancel()
        kept.cancel()
        await sessions.close_all()
        await models.close()
        outbox.close()
        admin.close()

    app.cleanup_ctx.append(lifecycle)
    return app
