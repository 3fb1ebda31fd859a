"""The Dreams hub: one generated stream, many viewers, a generator that runs only while watched.

::

    generator ──0x01 frames──▶ playback queue ──steady target fps──▶ release ─┬▶ frame cache (30)
    (worker on /ws/gpu,                                                      ├▶ WebSocket viewers
     or publish_frame)                                                       └▶ SSE clients

Lifecycle (``state``)::

    idle ──viewer / API access──▶ starting ──first frame──▶ ready
      ▲                              │  ▲                     │
      │                    failure   ▼  │ relaunch (backoff)  │ worker lost / no frames
      └──grace expired── stopping ◀─ error ◀──────────────────┘

One task (``dreams.lifecycle``) makes every transition that talks to the launcher or the
worker, one at a time; handlers only record activity and wake it. Presence is the number of
WebSocket and SSE viewers plus the time of the last API access: generation is *wanted* while a
viewer is connected or the last activity is younger than the grace period. When it stops being
wanted the hub saves the worker's state (0x12 → 0x02 snapshot), shuts it down (0x13) and stops
the launcher; the next launch gets the snapshot back (0x14) before it resumes (0x11).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from dreams.wire import MsgType, WorkerStatus, webp_size
from signalling.dreams.config import DreamsConfig
from signalling.dreams.frames import Frame, FrameCache, Playback, RateMeter
from signalling.dreams.launcher import Launcher
from signalling.dreams.links import ProtocolError, ViewerChannel, WorkerLink
from signalling.dreams.snapshot import load_snapshot, write_snapshot

__all__ = ["DreamsHub"]

logger = logging.getLogger(__name__)

STATE_MESSAGES = {
    "idle": "Dreams are sleeping",
    "starting": "Waking the dream machine...",
    "ready": "Dreams flowing...",
    "stopping": "Dreams fading...",
    "error": "The dream machine stumbled",
}
GPU_STATES = {
    "idle": "stopped",
    "starting": "starting",
    "ready": "running",
    "stopping": "stopping",
    "error": "error",
}

_STATUS_DECODER = msgspec.json.Decoder(WorkerStatus)
_JSON = msgspec.json.Encoder()


class DreamsHub:
    def __init__(
        self,
        config: DreamsConfig,
        launcher: Launcher,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.launcher = launcher
        launcher.bind(self._launcher_exited)
        self._clock = clock
        self._wall = wall_clock
        self.state = "idle"
        self.error_message: str | None = None
        self.worker: WorkerLink | None = None
        #: An encoded frame is never larger than the raw pixels of the configured size: the
        #: bound on each frame and so on the frame cache (cache_frames of them).
        self.max_frame_bytes = config.width * config.height * 3
        self.cache = FrameCache(config.cache_frames)
        self.playback = Playback(config.target_fps, config.buffer_seconds)
        self.resolution: tuple[int, int] = (config.width, config.height)
        self.frames_received = 0
        self.last_number = 0
        self.current_keyframe = 0
        self.snapshot: bytes | None = load_snapshot(config.state_path)
        # What the worker's latest 0x04 said about its next frame.
        self._next_number: int | None = None
        self._next_keyframe: int | None = None
        self._next_generation_ms: float | None = None
        self._receive_meter = RateMeter()
        self._release_meter = RateMeter()
        self._session_started: float | None = None
        self._session_frames = 0
        self._last_frame_at = -math.inf
        self._renumbering = False
        # Presence.
        self.viewers: set[ViewerChannel] = set()
        self.sse_count = 0
        self._connections: collections.Counter[str] = collections.Counter()
        self.last_activity = -math.inf
        self._last_api_access = -math.inf
        # Lifecycle.
        self._active = False
        self._stopping = False
        self._deadline = math.inf
        self._retry_at = 0.0
        self._backoff = config.retry_initial_s
        self.connect_url = ""
        self._wake = asyncio.Event()
        self._arrived = asyncio.Event()
        self._released = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Set by :meth:`close`: SSE streams end, no new generator starts.
        self.closing = False

    # ------------------------------------------------------------------ running

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx`` generator: the hub's tasks live as long as the application."""
        self._tasks = [
            asyncio.create_task(self._lifecycle_loop(), name="dreams.lifecycle"),
            asyncio.create_task(self._playback_loop(), name="dreams.playback"),
            asyncio.create_task(self._status_loop(), name="dreams.status"),
        ]
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.launcher.close()

    async def close(self, *, handshake: bool = True) -> None:
        """The server is stopping: save and stop the generator, close every viewer. Idempotent.

        Call it before the runner's cleanup (``close_dreams(app)``): once aiohttp's shutdown
        has begun it no longer reads from connections, so the worker's last snapshot cannot
        arrive. ``on_shutdown`` calls it with ``handshake=False`` as a fallback: 0x13 without
        waiting for replies (the hub keeps the worker's last keyframe checkpoint)."""
        if self.closing:
            return
        self.closing = True
        lifecycle = next((t for t in self._tasks if t.get_name() == "dreams.lifecycle"), None)
        if lifecycle is not None:  # no transition may race the final one
            lifecycle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lifecycle
        if self._active or self.worker is not None:
            try:
                await self._deactivate("server shutting down", handshake=handshake)
            except Exception:
                logger.exception("could not stop the generator cleanly")
        for viewer in list(self.viewers):
            await viewer.ws.close(code=1001, message=b"server shutting down")
        self._released.set()

    def healthy(self) -> tuple[bool, str]:
        for task in self._tasks:
            if task.done():
                return False, f"background task {task.get_name()} stopped"
        if self.state == "error":
            return False, self.error_message or "generator error"
        return True, ""

    # ------------------------------------------------------------------ presence

    @property
    def viewer_count(self) -> int:
        return len(self.viewers) + self.sse_count

    def admit(self, ip: str) -> str | None:
        """Take a long-lived connection slot for ``ip``; the refusal reason when none is free."""
        if self.viewer_count >= self.config.max_viewers:
            return f"Viewer limit reached. Max {self.config.max_viewers} connections."
        if self._connections[ip] >= self.config.max_connections_per_ip:
            return (
                "Too many connections from this IP. "
                f"Max {self.config.max_connections_per_ip} per IP."
            )
        self._connections[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self._connections[ip] -= 1
        if self._connections[ip] <= 0:
            del self._connections[ip]

    def touch(self) -> None:
        """API access: counts as viewer activity (starts generation, keeps it warm)."""
        now = self._clock()
        self.last_activity = self._last_api_access = now
        self._demand(now)

    def add_viewer(self, channel: ViewerChannel) -> None:
        self._joined()  # a state change is announced to the others; the newcomer gets it next
        self.viewers.add(channel)

    def remove_viewer(self, channel: ViewerChannel) -> None:
        self.viewers.discard(channel)
        self._left()

    def add_sse(self) -> None:
        self.sse_count += 1
        self._joined()

    def remove_sse(self) -> None:
        self.sse_count -= 1
        self._left()

    def _joined(self) -> None:
        now = self._clock()
        self.last_activity = now
        self._demand(now)

    def _left(self) -> None:
        self.last_activity = self._clock()
        self._wake.set()

    def _demand(self, now: float) -> None:
        if self.state == "idle" and not self._stopping:
            self._set_state("starting")
            self._deadline = now + self.config.start_timeout_s
        self._wake.set()

    def wanted(self, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return self.viewer_count > 0 or now < self.last_activity + self.config.grace_period_s

    # ------------------------------------------------------------------ frames in

    def publish_frame(
        self,
        webp: bytes,
        frame_number: int | None = None,
        keyframe_number: int | None = None,
        generation_time_ms: float = 0.0,
    ) -> Frame:
        """Take one generated frame (local mode calls this directly; the worker link does too).

        ``frame_number`` None (or not above the last one) numbers it after the last frame:
        numbers only grow. Raises ``ValueError`` for bytes that are not a WebP image."""
        width, height = webp_size(webp)
        now = self._clock()
        number = self.last_number + 1
        if frame_number is not None:
            if frame_number > self.last_number:
                number = frame_number
            elif not self._renumbering:
                self._renumbering = True
                logger.warning(
                    "generator sent frame %d after %d (it resumed from an older state): "
                    "numbering on from %d",
                    frame_number,
                    self.last_number,
                    number,
                )
        if keyframe_number is not None:
            self.current_keyframe = keyframe_number
        self.last_number = number
        frame = Frame(
            number=number,
            keyframe=self.current_keyframe,
            timestamp=self._wall(),
            generation_time_ms=generation_time_ms,
            data=bytes(webp),
            width=width,
            height=height,
        )
        self.resolution = (width, height)
        self.frames_received += 1
        self._session_frames += 1
        self._receive_meter.add(now)
        self._last_frame_at = now
        self.playback.push(frame, now)
        self._arrived.set()
        if self._active and self.state in ("starting", "error"):
            logger.info("first frame %d: ready", number)
            self.error_message = None
            self._backoff = self.config.retry_initial_s
            self._set_state("ready")
        return frame

    def _release(self, frame: Frame) -> None:
        self.cache.add(frame)
        self._release_meter.add(self._clock())
        message = frame.ws_message
        for viewer in self.viewers:
            viewer.offer(message)
        released, self._released = self._released, asyncio.Event()
        released.set()

    async def next_frame(self, after: int, timeout_s: float) -> Frame | None:
        """The newest released frame numbered above ``after``, waiting up to ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.closing:
                    latest = self.cache.latest()
                    if latest is not None and latest.number > after:
                        return latest
                    await self._released.wait()
        return None

    async def wait_state(self, *states: str, timeout_s: float) -> str:
        """Wait until the state is one of ``states`` (``TimeoutError`` after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while self.state not in states:
                await self._state_changed.wait()
        return self.state

    async def _playback_loop(self) -> None:
        while True:
            self._arrived.clear()
            now = self._clock()
            frame = self.playback.pop_due(now)
            if frame is not None:
                self._release(frame)
                continue
            wait = self.playback.wait_s(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._arrived.wait()

    # ------------------------------------------------------------------ the worker link

    async def attach_worker(self, link: WorkerLink) -> None:
        old, self.worker = self.worker, link
        if old is not None:
            logger.warning("worker %s replaces worker %s", link.peer, old.peer)
            old.closed.set()
            await old.ws.close(code=1000, message=b"replaced by a new worker connection")
        logger.info("worker connected from %s", link.peer)
        self._next_number = self._next_keyframe = self._next_generation_ms = None
        self._session_started = self._clock()
        self._session_frames = 0
        self._renumbering = False
        self._receive_meter.clear()
        if self.snapshot is not None:
            await link.send(MsgType.LOAD_STATE, self.snapshot)
        if self._active and not self._stopping:
            if self.state != "ready":
                self._set_state("starting")
            self._deadline = self._clock() + self.config.start_timeout_s
            await link.send(MsgType.RESUME)
        else:
            await link.send(MsgType.PAUSE)
        self._wake.set()

    def detach_worker(self, link: WorkerLink, reason: str) -> None:
        link.closed.set()
        if link is not self.worker:
            return
        self.worker = None
        if self._active and not self._stopping:
            self._fail(f"worker disconnected: {reason}")
        else:
            logger.info("worker %s disconnected: %s", link.peer, reason)

    async def on_worker_message(self, link: WorkerLink, data: bytes) -> None:
        """Dispatch one binary message; ``ProtocolError`` when it breaks the protocol."""
        if link is not self.worker:
            return
        if not data:
            raise ProtocolError("empty message")
        kind, payload = data[0], memoryview(data)[1:]
        if kind == MsgType.FRAME:
            if len(payload) > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {len(payload)} bytes, more than the {self.max_frame_bytes} a "
                    f"{self.config.width}x{self.config.height} frame may take"
                )
            try:
                self.publish_frame(
                    payload.tobytes(),
                    self._next_number,
                    self._next_keyframe,
                    self._next_generation_ms or 0.0,
                )
            except ValueError as exc:
                raise ProtocolError(f"bad frame: {exc}") from None
            self._next_number = self._next_keyframe = self._next_generation_ms = None
            link.frames += 1
        elif kind == MsgType.STATUS:
            self._apply_status(payload)
        elif kind == MsgType.STATE:
            if len(payload) > self.config.max_state_bytes:
                raise ProtocolError(
                    f"state snapshot of {len(payload)} bytes (max {self.config.max_state_bytes})"
                )
            try:
                msgspec.msgpack.decode(payload)
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"state snapshot is not msgpack: {exc}") from None
            self.snapshot = payload.tobytes()
            link.snapshot_received.set()
            logger.info("state snapshot saved (%d bytes)", len(payload))
            if self.config.state_path:
                await asyncio.to_thread(write_snapshot, self.config.state_path, self.snapshot)
        elif kind == MsgType.HEARTBEAT:
            pass
        else:
            raise ProtocolError(f"unknown message type 0x{kind:02x}")

    def _apply_status(self, payload: memoryview) -> None:
        try:
            status = _STATUS_DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad status: {exc}") from None
        if status.target_fps is not None:
            if not 0 < status.target_fps <= 120:
                raise ProtocolError(f"bad status: target_fps {status.target_fps}")
            if status.target_fps != self.playback.target_fps:
                self.playback.set_target_fps(status.target_fps)
                self._broadcast(self.config_message())
        if status.frame_number is not None:
            self._next_number = status.frame_number
        if status.keyframe is not None:
            self._next_keyframe = status.keyframe
            self.current_keyframe = status.keyframe
        if status.generation_time_ms is not None:
            self._next_generation_ms = status.generation_time_ms
        if status.resolution is not None:
            self.resolution = status.resolution
        if status.error:
            logger.warning("worker reports an error: %s", status.error)
            self.error_message = status.error

    def _launcher_exited(self, reason: str) -> None:
        if self._active and not self._stopping:
            self._fail(reason)

    # ------------------------------------------------------------------ lifecycle

    def _set_state(self, state: str, *, tell_viewers: bool = True) -> None:
        if state != self.state:
            logger.info("dreams: %s → %s", self.state, state)
            self.state = state
            if tell_viewers:
                self._broadcast(self.status_message())
            changed, self._state_changed = self._state_changed, asyncio.Event()
            changed.set()

    def _fail(self, reason: str) -> None:
        logger.warning("generator failed: %s", reason)
        self.error_message = reason
        now = self._clock()
        if self.state != "error":
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.config.retry_max_s)
        self._deadline = now + self.config.start_timeout_s
        self._set_state("error")
        self._wake.set()

    def _next_wakeup(self, now: float) -> float | None:
        times = []
        if self._active:
            if self.viewer_count == 0:
                times.append(self.last_activity + self.config.grace_period_s)
            if self.state == "ready":
                times.append(self._last_frame_at + self.config.stall_timeout_s)
            else:
                times.append(self._deadline)
                if self.worker is None and self.launcher.manages_worker:
                    times.append(self._retry_at)
        elif self.wanted(now):
            times.append(self._retry_at)
        soonest = min(times, default=math.inf)
        return None if soonest == math.inf else max(0.0, soonest - now)

    async def _lifecycle_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._step()
            except Exception:
                logger.exception("dreams lifecycle step failed")
                self._fail("internal error in the lifecycle (see the log)")
            wait = self._next_wakeup(self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _step(self) -> None:
        now = self._clock()
        wanted = self.wanted(now)
        if wanted and not self._active:
            if now >= self._retry_at:
                await self._activate()
        elif not wanted and self._active:
            await self._deactivate("grace period over")
        elif self._active and self.state == "ready":
            if now >= self._last_frame_at + self.config.stall_timeout_s:
                self._fail(f"no frame from the generator for {self.config.stall_timeout_s:g} s")
                if self.launcher.manages_worker:
                    if self.worker is not None:
                        await self.worker.ws.close(code=1011, message=b"stalled")
                    await self.launcher.stop()
        elif self._active and self.state != "ready":
            manages = self.launcher.manages_worker
            if self.worker is None and manages and not self.launcher.running():
                if now >= self._retry_at:
                    await self._launch()
            elif now >= self._deadline:
                self._fail(f"no frame from the generator within {self.config.start_timeout_s:g} s")
                if manages:
                    await self.launcher.stop()

    async def _activate(self) -> None:
        self._active = True
        self._set_state("starting")
        self._deadline = self._clock() + self.config.start_timeout_s
        if self.worker is not None:
            self._session_started = self._clock()
            self._session_frames = 0
            await self.worker.send(MsgType.RESUME)
        elif self.launcher.manages_worker:
            await self._launch()

    async def _launch(self) -> None:
        self._set_state("starting")
        self._deadline = self._clock() + self.config.start_timeout_s
        try:
            await self.launcher.start(self.connect_url)
        except Exception as exc:
            logger.exception("cannot start the generator")
            self._fail(f"cannot start the generator: {exc}")

    async def _deactivate(self, reason: str, *, handshake: bool = True) -> None:
        logger.info("stopping the generator: %s", reason)
        self._stopping = True
        self._set_state("stopping")
        try:
            link = self.worker
            timeout = self.config.save_timeout_s
            manages = self.launcher.manages_worker
            if link is not None and not handshake:
                await link.send(MsgType.SHUTDOWN if manages else MsgType.PAUSE)
            elif link is not None:
                link.snapshot_received.clear()
                if await link.send(MsgType.SAVE_STATE):
                    try:
                        async with asyncio.timeout(timeout):
                            await link.snapshot_received.wait()
                    except TimeoutError:
                        logger.warning("no state snapshot from the worker within %g s", timeout)
                if manages:
                    if await link.send(MsgType.SHUTDOWN):
                        try:
                            async with asyncio.timeout(timeout):
                                await link.closed.wait()
                        except TimeoutError:
                            logger.warning("worker still connected %g s after shutdown", timeout)
                    if not link.ws.closed:
                        await link.ws.close(code=1000, message=b"shutdown")
                else:
                    await link.send(MsgType.PAUSE)
            if manages:
                await self.launcher.stop()
        finally:
            self._stopping = False
            self._active = False
            self._retry_at = 0.0
            self._backoff = self.config.retry_initial_s
            self._session_started = None
            for frame in self.playback.drain():  # nobody is left to pace them for
                self._release(frame)
            # A viewer who came while it stopped sees "stopping" then "starting", never
            # "Dreams are sleeping" in between.
            wanted_again = self.wanted()
            self._set_state("idle", tell_viewers=not wanted_again)
            if wanted_again:
                self._demand(self._clock())

    # ------------------------------------------------------------------ reporting

    def _broadcast(self, message: str) -> None:
        for viewer in self.viewers:
            viewer.offer(message)

    def status_message(self) -> str:
        message = STATE_MESSAGES[self.state]
        if self.state == "error" and self.error_message:
            message = self.error_message
        return _JSON.encode(
            {
                "type": "status",
                "status": self.state,
                "message": message,
                "viewer_count": self.viewer_count,
            }
        ).decode()

    def config_message(self) -> str:
        return _JSON.encode({"type": "config", "target_fps": self.playback.target_fps}).decode()

    async def _status_loop(self) -> None:
        """Viewer counts to WebSocket viewers when they changed, every ``status_interval_s``."""
        last = -1
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            if self.viewer_count != last:
                last = self.viewer_count
                self._broadcast(self.status_message())

    def status(self) -> dict[str, Any]:
        now = self._clock()
        latest = self.cache.latest()
        uptime = 0.0 if self._session_started is None else now - self._session_started
        return {
            "status": self.state,
            "gpu": {
                "active": self.worker is not None and self.state == "ready",
                "state": GPU_STATES[self.state],
                "configured": self.launcher.configured,
                "provider": self.launcher.provider,
                "uptime_seconds": round(uptime),
                "frames_received": self.frames_received,
                "error_message": self.error_message,
            },
            "generation": {
                "frame_count": self.last_number,
                "current_frame": latest.number if latest is not None else 0,
                "current_keyframe": latest.keyframe if latest is not None else 0,
                "fps": round(self._receive_meter.rate(now), 2),
                "session_fps": round(self._session_frames / uptime, 2) if uptime > 0 else 0.0,
                "resolution": list(self.resolution),
            },
            "viewers": {
                "websocket_count": len(self.viewers),
                "api_active": now < self._last_api_access + self.config.grace_period_s,
            },
            "cache": {"frames_cached": len(self.cache), "total_bytes": self.cache.total_bytes},
            "playback": {
                "queue_depth": self.playback.depth,
                "buffer_seconds": self.playback.buffer_seconds,
                "target_fps": self.playback.target_fps,
                "actual_fps": round(self._release_meter.rate(now), 2),
                "underruns": self.playback.underruns,
                "dropped": self.playback.dropped,
                "viewer_frames_dropped": sum(v.dropped for v in self.viewers),
            },
        }
