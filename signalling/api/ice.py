"""ICE servers handed to browsers by ``GET /api/v1/webrtc/ice-servers``.

Always the configured STUN servers (Google's public one by default), then a static TURN server
if one is configured, then TURN credentials from Twilio's Network Traversal Service if an
account is configured. Twilio credentials expire, so they are fetched when asked for, not once at
start, and kept for ``cache_s`` seconds (60 by default, never longer than the token's own ttl)
so a burst of clients costs one request. A failed fetch logs a warning and answers with STUN and
the static server only; a failure is not cached, the next request tries again.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Annotated

import aiohttp
import msgspec

from signalling.api.types import IceServer

__all__ = ["DEFAULT_STUN_URL", "IceConfig", "IceServerProvider", "StaticTurn", "TwilioConfig"]

logger = logging.getLogger(__name__)

DEFAULT_STUN_URL = "stun:stun.l.google.com:19302"
TWILIO_BASE_URL = "https://api.twilio.com"


class StaticTurn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A TURN server with long-lived credentials (coturn and the like)."""

    urls: list[str]
    username: str
    credential: str


class TwilioConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Twilio account used to mint short-lived TURN credentials."""

    account_sid: str
    auth_token: str
    base_url: str = TWILIO_BASE_URL
    token_ttl_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0


class IceConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    stun_urls: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_STUN_URL])
    turn: StaticTurn | None = None
    twilio: TwilioConfig | None = None
    cache_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0


class _TwilioIceServer(msgspec.Struct):
    urls: str | list[str] | None = None
    url: str | None = None
    username: str | None = None
    credential: str | None = None


class _TwilioToken(msgspec.Struct):
    ice_servers: list[_TwilioIceServer]
    ttl: str | int | None = None


def _basic_auth(user: str, password: str) -> str:
    # By hand: aiohttp.BasicAuth is deprecated in 3.14, its replacement absent before it.
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class IceServerProvider:
    """Builds the ICE server list; owns the HTTP client used for Twilio. ``close()`` is
    idempotent."""

    def __init__(self, config: IceConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._twilio_cached: list[IceServer] = []
        self._twilio_expires_at = float("-inf")
        self._token_decoder = msgspec.json.Decoder(_TwilioToken)

    def _static_servers(self) -> list[IceServer]:
        servers = [IceServer(urls=list(self._config.stun_urls))] if self._config.stun_urls else []
        turn = self._config.turn
        if turn is not None:
            servers.append(
                IceServer(urls=list(turn.urls), username=turn.username, credential=turn.credential)
            )
        return servers

    async def ice_servers(self) -> list[IceServer]:
        servers = self._static_servers()
        if self._config.twilio is not None:
            servers.extend(await self._twilio_servers(self._config.twilio))
        return servers

    async def _twilio_servers(self, twilio: TwilioConfig) -> list[IceServer]:
        async with self._lock:
            now = self._clock()
            if now < self._twilio_expires_at:
                return self._twilio_cached
            try:
                servers, ttl_s = await self._fetch_twilio(twilio)
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
                logger.warning(
                    "fetching TURN credentials from Twilio failed (%s); serving STUN and static "
                    "TURN only",
                    exc,
                )
                return []
            lifetime_s = self._config.cache_s if ttl_s is None else min(self._config.cache_s, ttl_s)
            self._twilio_cached = servers
            self._twilio_expires_at = now + lifetime_s
            return servers

    async def _fetch_twilio(self, twilio: TwilioConfig) -> tuple[list[IceServer], float | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{twilio.base_url.rstrip('/')}/2010-04-01/Accounts/{twilio.account_sid}/Tokens.json"
        data = {"Ttl": str(twilio.token_ttl_s)} if twilio.token_ttl_s is not None else None
        async with self._session.post(
            url,
            data=data,
            headers={"Authorization": _basic_auth(twilio.account_sid, twilio.auth_token)},
            timeout=aiohttp.ClientTimeout(total=twilio.timeout_s),
        ) as response:
            if response.status >= 400:
                raise ValueError(f"Twilio answered HTTP {response.status}")
            token = self._token_decoder.decode(await response.read())
        servers = []
        for entry in token.ice_servers:
            urls = entry.urls if entry.urls is not None else entry.url
            if urls is None:
                continue
            servers.append(
                IceServer(urls=urls, username=entry.username, credential=entry.credential)
            )
        if not servers:
            raise ValueError("Twilio token has no ice_servers")
        ttl_s = float(token.ttl) if token.ttl is not None else None
        return servers, ttl_s

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
