"""Configuration of the HTTP API: one msgspec Struct, part of the supervisor's config tree."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from signalling.api.cors import CorsConfig
from signalling.api.ice import IceConfig
from signalling.connections import ConnectionLimits

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiConfig"]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class ApiConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_BODY_BYTES
    cors: CorsConfig = msgspec.field(default_factory=CorsConfig)
    #: Names this server answers to besides IP addresses and localhost (``signalling.api.hosts``:
    #: the Host check against DNS rebinding). ``".example.com"``: it and every name under it.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    connections: ConnectionLimits = msgspec.field(default_factory=ConnectionLimits)
    ice: IceConfig = msgspec.field(default_factory=IceConfig)
    #: Which video codec a session uses when the client offers both: ``offer`` (the client's
    #: order; browsers put VP8 first) or one to prefer. H.264 costs dreamwire about a third
    #: less CPU per session than VP8 (``scripts/bench_e2e.py --codec``).
    video_codec: Literal["offer", "VP8", "H264"] = "offer"
