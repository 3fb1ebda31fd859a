#!/usr/bin/env python3
"""The baseline for ``bench_e2e.py``: a video server written the way people usually write one.

One process, one event loop, plain aiortc: the receiver decodes (aiortc's decoder thread), an
output track awaits the input track's next frame, passes it through numpy (``to_ndarray`` →
``from_ndarray``, the shape of a real model's input and output) and aiortc's sender encodes it.
It speaks just enough of dreamwire's (Scope's) HTTP API for ``scripts/client.py``: pipeline
load/status (always "passthrough", always loaded), the offer, and DELETE.

Measurement only (not part of the processing): the server-side latency of each frame is taken
exactly as dreamwire takes it, first RTP packet of the frame → its last RTP packet handed to
the transport (the sender's next ``recv()``), and served at ``GET /baseline/stats``.

``--marker-bit``: the receiver completes a frame on its last packet's RTP marker bit, as
dreamwire's signalling does (``signalling.webrtc.forwarding.complete_on_marker``), instead of
when the next frame's first packet arrives: the same server otherwise, so a benchmark can tell
what the marker bit buys from what the process design costs.

    python scripts/baseline_server.py --port 8100 [--marker-bit]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import secrets
import time
from typing import Any

import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from signalling.webrtc.forwarding import complete_on_marker

logger = logging.getLogger("baseline")

SAMPLES = 20_000


class Latencies:
    def __init__(self) -> None:
        self.samples_ms: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.frames_out = 0


def instrument_arrivals(receiver: RTCRtpReceiver, marker_bit: bool = False) -> dict[int, int]:
    """Map each frame's pts (aiortc's mapped RTP timestamp) to its first packet's arrival;
    ``marker_bit``: hand a frame to the decoder as soon as its marker packet is in."""
    arrivals_by_raw: collections.OrderedDict[int, int] = collections.OrderedDict()
    by_pts: collections.OrderedDict[int, int] = collections.OrderedDict()
    jitter = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
    add = jitter.add
    origin: list[int] = []

    def timed_add(packet: Any) -> Any:
        now = time.monotonic_ns()
        arrivals_by_raw.setdefault(packet.timestamp, now)
        while len(arrivals_by_raw) > 256:
            arrivals_by_raw.popitem(last=False)
        pli, frame = add(packet)
        if frame is None and marker_bit:
            frame = complete_on_marker(jitter, packet)
        if frame is not None:
            if not origin:
                origin.append(frame.timestamp)
            pts = (frame.timestamp - origin[0]) % (1 << 32)
            by_pts[pts] = arrivals_by_raw.pop(frame.timestamp, now)
            while len(by_pts) > 256:
                by_pts.popitem(last=False)
        return pli, frame

    jitter.add = timed_add
    return by_pts


class PassthroughTrack(MediaStreamTrack):
    """The usual shape: ``recv`` awaits the camera track, runs numpy, returns the frame."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, arrivals: dict[int, int], lat: Latencies) -> None:
        super().__init__()
        self.source = source
        self.arrivals = arrivals
        self.lat = lat
        self._in_flight: int | None = None

    async def recv(self) -> av.VideoFrame:
        if self._in_flight is not None:  # the sender is back: the previous frame is sent
            self.lat.samples_ms.append((time.monotonic_ns() - self._in_flight) / 1e6)
            self.lat.frames_out += 1
            self._in_flight = None
        frame = await self.source.recv()
        assert isinstance(frame, av.VideoFrame) and frame.pts is not None
        rgb = frame.to_ndarray(format="rgb24")  # the model's input
        out = av.VideoFrame.from_ndarray(rgb, format="rgb24")  # its output
        out.pts = frame.pts
        out.time_base = frame.time_base
        self._in_flight = self.arrivals.pop(frame.pts, None)
        return out


def create_app(marker_bit: bool = False) -> web.Application:
    pcs: dict[str, RTCPeerConnection] = {}
    lat = Latencies()

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"message": "ok"})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "loaded", "pipeline_id": "passthrough"})

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session_id = secrets.token_hex(8)
        pcs[session_id] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
            arrivals = instrument_arrivals(receiver, marker_bit)
            pc.addTrack(PassthroughTrack(track, arrivals, lat))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                pcs.pop(session_id, None)
                await pc.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response(
            {"sdp": pc.localDescription.sdp, "type": "answer", "sessionId": session_id}
        )

    async def delete(request: web.Request) -> web.Response:
        pc = pcs.pop(request.match_info["session_id"], None)
        if pc is not None:
            await pc.close()
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        if request.query.get("reset"):
            lat.samples_ms.clear()
        return web.json_response(
            {
                "frames_out": lat.frames_out,
                "latencies_ms": list(lat.samples_ms),
                "sessions": len(pcs),
            }
        )

    async def close_all(app: web.Application) -> None:
        await asyncio.gather(*(pc.close() for pc in pcs.values()))

    app = web.Application()
    app.router.add_post("/api/v1/pipeline/load", load)
    app.router.add_get("/api/v1/pipeline/status", status)
    app.router.add_post("/api/v1/webrtc/offer", offer)
    app.router.add_delete("/api/v1/webrtc/offer/{session_id}", delete)
    app.router.add_get("/baseline/stats", stats)
    app.on_shutdown.append(close_all)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--marker-bit", action="store_true", help="complete frames on the RTP marker bit"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    web.run_app(create_app(args.marker_bit), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
