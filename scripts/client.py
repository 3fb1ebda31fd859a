#!/usr/bin/env python3
"""A Python client for dreamwire (or Daydream Scope): what the reference pages' JavaScript does.

Loads a pipeline and waits for ``loaded``, connects over WebRTC sending a video file, a
generated test pattern (the frame number drawn into each frame) or nothing (text to video),
sends parameters over the ``parameters`` data channel, saves the returned video, and prints
fps and latency (round trip, from the frame numbers drawn into the pattern).

    python scripts/client.py --pipeline passthrough --pattern --duration 10 --output out.mp4
    python scripts/client.py --pipeline testcard --no-input --params '{"prompts": [...]}'
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.testpattern import PATTERN_MODULUS, draw_frame_number, read_frame_number

logger = logging.getLogger("client")

VIDEO_CLOCK_HZ = 90_000
LOAD_TIMEOUT_S = 600.0


class ClientError(RuntimeError):
    pass


class PatternTrack(VideoStreamTrack):
    """Frames with their number drawn in (readable after coding and scaling), at ``fps``."""

    def __init__(self, width: int, height: int, fps: float) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.sent_at: dict[int, float] = {}
        self.count = 0
        self._start = 0.0
        ramp = np.linspace(40, 215, width, dtype=np.uint8)
        self.background = np.repeat(np.stack([ramp, ramp[::-1], ramp], axis=-1)[None], height, 0)

    async def recv(self) -> av.VideoFrame:
        n = self.count
        if n == 0:
            self._start = time.monotonic()
        else:
            due = self._start + n / self.fps
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
        self.count += 1
        rgb = self.background.copy()
        draw_frame_number(rgb, n)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = int(n * VIDEO_CLOCK_HZ / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        self.sent_at[n % PATTERN_MODULUS] = time.monotonic()
        return frame


@dataclass
class Received:
    frames: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    width: int = 0
    height: int = 0
    numbers: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    last_rgb: np.ndarray | None = None
    #: Frames whose drawn number could not be read, and the first of them (to look at).
    unreadable: int = 0
    unreadable_sample: np.ndarray | None = None

    def fps(self) -> float:
        if self.frames < 2 or self.last_at <= self.first_at:
            return 0.0
        return (self.frames - 1) / (self.last_at - self.first_at)


class DreamwireClient:
    """One connection; usable from tests (async) and from the command line."""

    def __init__(self, base_url: str, ice_servers: list[RTCIceServer] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http: aiohttp.ClientSession | None = None
        self.pc: RTCPeerConnection | None = None
        self.session_id: str | None = None
        self.pattern: PatternTrack | None = None
        self.received = Received()
        self.messages: list[dict[str, Any]] = []
        self.message_event = asyncio.Event()
        self.frame_event = asyncio.Event()
        self._ice_override = ice_servers
        self._channel: Any = None
        self._channel_open = asyncio.Event()
        self._recorder: _Recorder | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> DreamwireClient:
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ HTTP

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.base_url + path, json=body) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            return resp.status, data

    async def load_pipeline(
        self,
        pipeline_id: str,
        load_params: dict[str, Any] | None = None,
        timeout_s: float = LOAD_TIMEOUT_S,
    ) -> dict[str, Any]:
        body = {"pipeline_id": pipeline_id, "load_params": load_params or {}}
        return await self._load(body, pipeline_id, timeout_s)

    async def load_pipelines(
        self, pipelines: list[dict[str, Any]], timeout_s: float = LOAD_TIMEOUT_S
    ) -> dict[str, Any]:
        """Load a chain (``[{"pipeline_id": …, "load_params": …}, …]``, e.g. a pipeline and
        ``moondream``) and wait until it is loaded."""
        return await self._load({"pipelines": pipelines}, None, timeout_s)

    async def _load(
        self, body: dict[str, Any], pipeline_id: str | None, timeout_s: float
    ) -> dict[str, Any]:
        status, data = await self.request("POST", "/api/v1/pipeline/load", body)
        if status != 200:
            raise ClientError(f"load failed ({status}): {data}")
        deadline = time.monotonic() + timeout_s
        while True:
            _, state = await self.request("GET", "/api/v1/pipeline/status")
            if state["status"] == "loaded" and pipeline_id in (None, state.get("pipeline_id")):
                return dict(state)
            if state["status"] == "error":
                raise ClientError(f"pipeline failed to load: {state.get('error')}")
            if time.monotonic() > deadline:
                raise ClientError(f"pipeline not loaded after {timeout_s:.0f} s: {state}")
            await asyncio.sleep(0.2)

    async def ice_servers(self) -> list[RTCIceServer]:
        if self._ice_override is not None:
            return self._ice_override
        _, data = await self.request("GET", "/api/v1/webrtc/ice-servers")
        return [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in data["iceServers"]
        ]

    # ------------------------------------------------------------------ WebRTC

    async def connect(
        self,
        source: MediaStreamTrack | None,
        initial_parameters: dict[str, Any] | None = None,
        codec: str | None = None,
        trackless: str = "recvonly",
    ) -> str:
        """Offer (sending ``source``, or receive-only when None) and wait for the answer.
        ``trackless="sendrecv"`` offers a bare ``addTransceiver("video")`` instead, as Scope's
        web UI does in text mode."""
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=await self.ice_servers()))
        if source is not None:
            transceiver = pc.addTransceiver(source, direction="sendrecv")
        else:
            transceiver = pc.addTransceiver("video", direction=trackless)
        if codec is not None:
            from aiortc import RTCRtpSender

            caps = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences(
                [c for c in caps if c.mimeType.lower() == f"video/{codec.lower()}"]
            )
        channel = pc.createDataChannel("parameters")
        self._channel = channel
        channel.on("open", self._channel_open.set)

        @channel.on("message")
        def on_message(raw: str | bytes) -> None:
            message = json.loads(raw)
            self.messages.append(message)
            self.message_event.set()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._consume(track), name="client.recv"))

        await pc.setLocalDescription(await pc.createOffer())
        data = await self._offer(pc.localDescription, initial_parameters)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type=data["type"]))
        return str(self.session_id)

    async def _offer(
        self, offer: RTCSessionDescription, initial_parameters: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Send the offer (Scope's endpoint); the answer, with ``session_id`` set."""
        body: dict[str, Any] = {"sdp": offer.sdp, "type": offer.type}
        if initial_parameters is not None:
            body["initialParameters"] = initial_parameters
        status, data = await self.request("POST", "/api/v1/webrtc/offer", body)
        if status != 200:
            raise ClientError(f"offer refused ({status}): {data}")
        self.session_id = data["sessionId"]
        return dict(data)

    async def _consume(self, track: MediaStreamTrack) -> None:
        rec = self.received
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.VideoFrame)  # the only track is video
            now = time.monotonic()
            rgb = frame.to_ndarray(format="rgb24")
            rec.frames += 1
            rec.first_at = rec.first_at or now
            rec.last_at = now
            rec.height, rec.width = rgb.shape[:2]
            rec.last_rgb = rgb
            number = read_frame_number(rgb)
            if number is None:
                rec.unreadable += 1
                if rec.unreadable_sample is None:
                    rec.unreadable_sample = rgb
            else:
                rec.numbers.append(number)
                if self.pattern is not None and number in self.pattern.sent_at:
                    rec.latencies_ms.append((now - self.pattern.sent_at[number]) * 1e3)
            if self._recorder is not None:
                self._recorder.write(frame)
            self.frame_event.set()

    async def send_parameters(self, params: dict[str, Any]) -> None:
        await asyncio.wait_for(self._channel_open.wait(), 10)
        self._channel.send(json.dumps(params))

    async def wait_frames(self, count: int, timeout_s: float = 20.0) -> None:
        """Wait until ``count`` more frames arrived."""
        target = self.received.frames + count
        deadline = time.monotonic() + timeout_s
        while self.received.frames < target:
            self.frame_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    f"only {self.received.frames} of {target} frames after {timeout_s} s"
                )
            try:
                await asyncio.wait_for(self.frame_event.wait(), remaining)
            except TimeoutError:
                continue

    async def wait_message(self, type_: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if message.get("type") == type_:
                    self.messages.remove(message)
                    return message
            seen = len(self.messages)
            self.message_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(f"no {type_!r} message in {timeout_s} s: {self.messages}")
            try:
                await asyncio.wait_for(self.message_event.wait(), remaining)
            except TimeoutError:
                continue

    def record(self, path: Path, fps: float) -> None:
        self._recorder = _Recorder(path, fps)

    async def disconnect(self) -> None:
        if self.session_id is not None and self.http is not None:
            await self.request("DELETE", f"/api/v1/webrtc/offer/{self.session_id}")
            self.session_id = None
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def close(self) -> None:
        await self.disconnect()
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        if self.http is not None:
            await self.http.close()
            self.http = None


class FastRTCClient(DreamwireClient):
    """The same client against a FastRTC server, the way FastRTC's own JavaScript talks to it:
    the offer to ``POST /webrtc/offer`` with an id the client picks (``webrtc_id``), a data
    channel (FastRTC's video callback waits for one), then the app's input hook
    (``POST /input_hook``, as FastRTC's examples write it) so that its handler runs."""

    async def load_pipeline(
        self,
        pipeline_id: str,
        load_params: dict[str, Any] | None = None,
        timeout_s: float = LOAD_TIMEOUT_S,
    ) -> dict[str, Any]:
        return {}  # a FastRTC app is its one handler

    async def _offer(
        self, offer: RTCSessionDescription, initial_parameters: dict[str, Any] | None
    ) -> dict[str, Any]:
        webrtc_id = secrets.token_hex(8)
        body = {"sdp": offer.sdp, "type": offer.type, "webrtc_id": webrtc_id}
        status, data = await self.request("POST", "/webrtc/offer", body)
        if status != 200 or not isinstance(data, dict) or "sdp" not in data:
            raise ClientError(f"offer refused ({status}): {data}")
        status, hooked = await self.request("POST", "/input_hook", {"webrtc_id": webrtc_id})
        if status != 200:
            raise ClientError(f"input hook refused ({status}): {hooked}")
        self.fastrtc_id = webrtc_id
        return dict(data)


class _Recorder:
    def __init__(self, path: Path, fps: float) -> None:
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=int(fps))
        self.stream.pix_fmt = "yuv420p"
        self.count = 0

    def write(self, frame: av.VideoFrame) -> None:
        if self.count == 0:
            self.stream.width, self.stream.height = frame.width, frame.height
        out = frame.reformat(width=self.stream.width, height=self.stream.height, format="yuv420p")
        out.pts = self.count
        self.count += 1
        for packet in self.stream.encode(out):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(args: argparse.Namespace) -> int:
    ice: list[RTCIceServer] | None = [] if args.no_stun else None
    async with DreamwireClient(args.url, ice_servers=ice) as client:
        load_params = json.loads(args.load_params) if args.load_params else None
        state = await client.load_pipeline(args.pipeline, load_params)
        print(f"pipeline {state['pipeline_id']} loaded", file=sys.stderr)
        source: MediaStreamTrack | None = None
        if args.input:
            source = MediaPlayer(args.input).video
        elif not args.no_input:
            client.pattern = PatternTrack(args.width, args.height, args.fps)
            source = client.pattern
        if args.output:
            client.record(Path(args.output), args.fps)
        initial = json.loads(args.params) if args.params else None
        await client.connect(source, initial, codec=args.codec)
        await client.wait_frames(1, timeout_s=30)
        started = time.monotonic()
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(0.5)
            for message in client.messages:
                print(f"server: {json.dumps(message)}", file=sys.stderr)
            client.messages.clear()
        rec = client.received
        stats = {
            "frames": rec.frames,
            "fps": round(rec.fps(), 2),
            "resolution": f"{rec.width}x{rec.height}",
            "latency_p50_ms": round(percentile(rec.latencies_ms, 50), 1),
            "latency_p95_ms": round(percentile(rec.latencies_ms, 95), 1),
        }
        print(json.dumps(stats) if args.json else "  ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pipeline", default="passthrough")
    parser.add_argument("--load-params", help="JSON object of load-time parameters")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--input", help="a video file to send")
    group.add_argument("--pattern", action="store_true", help="send a test pattern (default)")
    group.add_argument("--no-input", action="store_true", help="receive only (text to video)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--codec", choices=["VP8", "H264"], help="prefer this codec")
    parser.add_argument("--params", help="JSON object: initial parameters")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to stream")
    parser.add_argument("--output", help="save the returned video here (e.g. out.mp4)")
    parser.add_argument("--no-stun", action="store_true", help="use no ICE servers (loopback)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        return asyncio.run(run(args))
    except ClientError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
