"""The aiohttp application of the signalling process."""

from __future__ import annotations

from aiohttp import web

from signalling.control import ControlLink

control_key = web.AppKey("control", ControlLink)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(control: ControlLink) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[control_key] = control
    app.router.add_get("/health", health)
    return app
