"""HTTP endpoints of the metrics (``signalling.metrics``).

* ``GET /api/v1/metrics`` → :class:`~signalling.metrics.MetricsReport` as JSON; with
  ``?session=<id>`` that session only (404 ``unknown_session`` if it is not live).
* ``GET /api/v1/metrics/traces?after=<seq>&limit=<n>`` → :class:`~signalling.metrics.TraceFeed`:
  complete frame traces newer than ``after`` (what ``supervisor profile`` polls).
* ``GET /metrics`` → Prometheus text format (the app's own registry).

Per-process CPU/memory and ring counters come from the supervisor's status, asked for on each
request; if the supervisor does not answer in time the report simply has none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services import protocol as p
from signalling.metrics import TRACE_BUFFER, MetricsAggregator

logger = logging.getLogger(__name__)

#: How long a metrics request waits for the supervisor's status.
STATUS_TIMEOUT_S = 2.0

StatusSource = Callable[[], Awaitable[p.StatusReport]]

metrics_key = web.AppKey("metrics", MetricsAggregator)

_encoder = msgspec.json.Encoder()


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(payload),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def add_metrics_routes(
    app: web.Application, metrics: MetricsAggregator, status: StatusSource | None = None
) -> None:
    """Register the metrics endpoints on ``app``; ``status`` asks the supervisor for its
    ``StatusReport`` (processes and rings)."""
    app[metrics_key] = metrics

    async def fetch_status() -> p.StatusReport | None:
        if status is None:
            return None
        try:
            return await asyncio.wait_for(status(), STATUS_TIMEOUT_S)
        except Exception as exc:  # the metrics answer without the supervisor's part
            logger.debug("no supervisor status for the metrics: %s", exc)
            return None

    async def get_metrics(request: web.Request) -> web.Response:
        session_id = request.query.get("session")
        if session_id is not None and session_id not in metrics.sessions:
            return _json(
                {"error": "unknown_session", "detail": f"Session {session_id} not found"}, 404
            )
        report_status = await fetch_status()
        try:
            report = metrics.report(report_status, session_id)
        except KeyError:  # closed while we waited for the status
            return _json(
                {"error": "unknown_session", "detail": f"Session {session_id} not found"}, 404
            )
        return _json(report)

    async def get_traces(request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", str(TRACE_BUFFER)))
        except ValueError:
            return _json(
                {"error": "bad_request", "detail": "after and limit must be integers"}, 400
            )
        return _json(metrics.traces_after(after, max(1, limit)))

    async def get_prometheus(request: web.Request) -> web.Response:
        report_status = await fetch_status()
        if report_status is not None:
            metrics.last_status = report_status
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/api/v1/metrics", get_metrics)
    app.router.add_get("/api/v1/metrics/traces", get_traces)
    app.router.add_get("/metrics", get_prometheus)
