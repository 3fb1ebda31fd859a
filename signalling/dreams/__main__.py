"""Serve the Dreams API alone: ``python -m signalling.dreams --port 8765`` (development).

dreamwire itself mounts it in the signalling process (``add_dreams_routes``); this runs the same
routes without the rest of the server. Settings: ``--config`` (a JSON ``DreamsConfig``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import msgspec
from aiohttp import web

from services.runtime import configure_logging
from signalling.dreams.config import DreamsConfig
from signalling.dreams.routes import add_dreams_routes, close_dreams


async def serve(host: str, port: int, config: DreamsConfig) -> None:
    app = web.Application()
    add_dreams_routes(app, config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"dreams on http://{host}:{port}/dreams", flush=True)
        await stop.wait()
    finally:
        await close_dreams(app)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m signalling.dreams")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--config", default="{}", help="DreamsConfig as JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging("dreams", args.log_level)
    config = msgspec.json.decode(args.config, type=DreamsConfig)
    asyncio.run(serve(args.host, args.port, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
