"""Entry point of the signalling process (started by the supervisor)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import msgspec
from aiohttp import web

from services import protocol as p
from services.inference import registry
from services.runtime import SPEC_ENV, ServiceSpec, configure_logging, die_with_parent
from signalling.app import create_app, guard_key
from signalling.connections import GuardedSite
from signalling.control import ControlLink
from signalling.dreams.routes import close_dreams
from signalling.options import SignallingOptions
from signalling.webrtc.forwarding import check_marker_completion

logger = logging.getLogger(__name__)


async def serve(spec: ServiceSpec) -> None:
    check_marker_completion()  # before saying hello: a start-up failure names the cause
    link = ControlLink(spec)
    await link.hello()
    options = msgspec.convert(spec.options, SignallingOptions)
    host, port = options.host, options.port
    app = create_app(spec, link)
    guard = app[guard_key]
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # aiohttp's own timer as a backstop; the guard closes idle connections first (and
        # counts them).
        keepalive_timeout=2 * guard.limits.idle_timeout_s,
    )
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, guard)
        try:
            await site.start()
        except OSError as exc:
            await link.send(
                p.ServiceFailed(service=spec.name, reason=f"cannot listen on {host}:{port}: {exc}")
            )
            raise
        logger.info("listening on http://%s:%d/", host, port)
        # Discover the pipelines (and import their plugins' spec modules) before serving: a
        # slow plugin import must not stall the event loop under a request later.
        registry.specs()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, link.stopped.set)
        await link.ready()
        await link.run()
    finally:
        # Before cleanup: aiohttp stops reading connections once shutdown starts, and the
        # Dreams worker's final saved state must still arrive.
        await close_dreams(runner.app)
        await runner.cleanup()
        link.close()


def main() -> int:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        print(
            f"{SPEC_ENV} is not set: signalling is started by `supervisor start`", file=sys.stderr
        )
        return 2
    spec = msgspec.json.decode(raw, type=ServiceSpec)
    configure_logging(spec.name, spec.log_level, spec.run_dir)
    # aioice logs every ICE candidate pair at INFO.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    die_with_parent(spec.supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(serve(spec))
    except OSError as exc:
        logger.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
