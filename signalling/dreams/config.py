"""Configuration of the Dreams broadcast: one msgspec Struct, meant for the supervisor's tree."""

from __future__ import annotations

import os
import secrets
from typing import Annotated, Literal

import msgspec

from dreams.wire import AUTH_TOKEN_ENV
from signalling.dreams.client_ip import parse_networks

__all__ = ["AUTH_TOKEN_ENV", "DreamsConfig", "LauncherConfig", "resolve_auth_token"]

#: Shared secret of the GPU worker link, on the hub and on the worker (as the Dreams API says).

Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class LauncherConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Who starts and stops the generator.

    * ``local``: the hub runs ``python -m dreams.worker --connect <connect_url>`` as a child
      process while someone watches, and stops it after the grace period.
    * ``external``: a worker started by someone else (``supervisor worker --connect`` on a GPU
      host) connects when it likes; the hub pauses it (0x10) when nobody watches and resumes it
      (0x11) when someone does.

    A cloud launcher (RunPod, …) is a :class:`signalling.dreams.launcher.Launcher` passed to
    ``add_dreams_routes``; see that module.
    """

    kind: Literal["local", "external"] = "local"
    #: Where a local worker connects; "" = ws://127.0.0.1:<port of the request that woke it>/ws/gpu.
    connect_url: str = ""
    #: Generator of a local worker (``supervisor worker --generator``): ``testcard``, or
    #: ``pipeline:<id>`` for a text-mode inference pipeline (``dream``; ``testcard`` in tests).
    generator: str = "testcard"
    #: Extra arguments for a local worker, e.g. ``["--models-dir", "/models", "--load-params",
    #: '{"keyframe_interval": 8}']`` for ``pipeline:dream``.
    worker_args: list[str] = []
    #: SIGTERM, then SIGKILL after this long, for a local worker that does not exit.
    kill_timeout_s: Positive = 5.0


class DreamsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    #: Playback rate until the worker announces its own (0x04 ``target_fps``).
    target_fps: Annotated[float, msgspec.Meta(gt=0, le=120)] = 5.0
    #: Resolution advertised before the first frame (then the frames' own).
    width: Count = 1024
    height: Count = 512
    #: Frames kept for ``/api/dreams/frame/{n}`` and ``frames/recent`` (the API caps count at 30).
    cache_frames: Count = 30
    #: Playback prebuffer: frames are held this long to smooth the worker's jitter.
    buffer_seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: After the last viewer leaves (or the last API access), keep generating this long.
    grace_period_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    #: A generator that has sent no frame this long after being started is an error.
    start_timeout_s: Positive = 180.0
    #: A ready generator that sends no frame this long has stalled (restarted when local).
    stall_timeout_s: Positive = 30.0
    #: Shutdown handshake: wait this long for the 0x02 snapshot after 0x12, and as long again
    #: for the worker to hang up after 0x13.
    save_timeout_s: Positive = 10.0
    #: Relaunch backoff after a generator failure (doubles up to the max, reset by a frame).
    retry_initial_s: Positive = 1.0
    retry_max_s: Positive = 30.0
    #: Per IP and endpoint, on the rate-limited endpoints.
    rate_limit_requests: Count = 60
    rate_limit_window_s: Positive = 60.0
    #: Long-lived viewer connections (WebSocket and SSE) per IP, and in all.
    max_connections_per_ip: Count = 10
    max_viewers: Count = 1000
    #: Frames waiting for one slow WebSocket viewer before its oldest are dropped.
    viewer_queue_frames: Count = 8
    #: Status to SSE clients (and viewer counts to WebSocket viewers) this often.
    status_interval_s: Positive = 5.0
    #: A worker that sends nothing this long is disconnected.
    worker_timeout_s: Positive = 30.0
    max_worker_message_bytes: Count = 8 * 1024 * 1024
    max_state_bytes: Count = 1024 * 1024
    #: Bearer token of ``/ws/gpu``; None reads ``DREAM_GEN_AUTH_TOKEN``, or makes a random one
    #: for the local worker; "" = no token (loopback workers only, never replacing a live one).
    auth_token: str | None = None
    #: Base URL used by ``/api/dreams/embed``; "" = the request's own scheme and host.
    public_url: str = ""
    #: Reverse proxies (addresses or networks) whose ``X-Forwarded-For`` names the client for
    #: the per-IP limits; empty: the peer's own address, and the header is ignored.
    trusted_proxies: list[str] = []
    #: File keeping the last state snapshot across restarts of the server; "" = memory only.
    state_path: str = ""
    launcher: LauncherConfig = msgspec.field(default_factory=LauncherConfig)

    def __post_init__(self) -> None:
        parse_networks(self.trusted_proxies)  # a bad entry fails at start-up, named


def resolve_auth_token(config: DreamsConfig) -> str:
    """The token ``/ws/gpu`` requires: the configured one, else ``DREAM_GEN_AUTH_TOKEN``, else
    for a local launcher a new random one (handed to its worker), so the local worker always
    proves itself. "" (``auth_token = ""``, or an external launcher with no token set): loopback
    workers without a token, which never replace a connected one."""
    if config.auth_token is not None:
        return config.auth_token
    if token := os.environ.get(AUTH_TOKEN_ENV):
        return token
    return secrets.token_urlsafe(32) if config.launcher.kind == "local" else ""
