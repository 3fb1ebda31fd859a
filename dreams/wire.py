"""The binary protocol of ``WS /ws/gpu`` and the checks a frame must pass.

Every message is binary: one type byte, then the payload::

    GPU → hub   0x01 frame (WebP bytes)     0x02 state snapshot (msgpack)
                0x03 heartbeat (payload ignored)   0x04 status (JSON object)
    hub → GPU   0x10 pause   0x11 resume   0x12 save state   0x13 shutdown
                0x14 load state (msgpack: a snapshot the worker sent earlier)

The hub keeps snapshots opaque: it checks that they are msgpack and hands them back unchanged.
A 0x04 status is a JSON object; the keys the hub understands are in :class:`WorkerStatus`
(all optional, others ignored). dreamwire's worker sends one before every frame with that
frame's number, keyframe number and generation time, so the hub's ``X-Frame-Number`` is the
number the worker drew; a worker that sends bare frames gets consecutive numbers.
"""

from __future__ import annotations

import enum
import struct

import msgspec

__all__ = [
    "AUTH_TOKEN_ENV",
    "DreamState",
    "MsgType",
    "WorkerStatus",
    "control",
    "webp_size",
]


class MsgType(enum.IntEnum):
    FRAME = 0x01
    STATE = 0x02
    HEARTBEAT = 0x03
    STATUS = 0x04
    PAUSE = 0x10
    RESUME = 0x11
    SAVE_STATE = 0x12
    SHUTDOWN = 0x13
    LOAD_STATE = 0x14


WORKER_TO_HUB = frozenset({MsgType.FRAME, MsgType.STATE, MsgType.HEARTBEAT, MsgType.STATUS})
HUB_TO_WORKER = frozenset(
    {MsgType.PAUSE, MsgType.RESUME, MsgType.SAVE_STATE, MsgType.SHUTDOWN, MsgType.LOAD_STATE}
)


def control(kind: MsgType, payload: bytes = b"") -> bytes:
    return bytes((kind,)) + payload


class WorkerStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The keys of a 0x04 status the hub reads; unknown keys are allowed and ignored."""

    target_fps: float | None = None
    keyframe: int | None = None
    #: Number of the frame that follows this status.
    frame_number: int | None = None
    generation_time_ms: float | None = None
    resolution: tuple[int, int] | None = None
    #: ``running`` | ``paused`` | free text; informational.
    state: str | None = None
    message: str | None = None
    error: str | None = None


def webp_size(data: bytes | memoryview) -> tuple[int, int]:
    """Width and height of a WebP image; ``ValueError`` when ``data`` is not one.

    Reads the RIFF container and the first chunk (``VP8 ``, ``VP8L`` or ``VP8X``)."""
    if len(data) < 30:
        raise ValueError(f"{len(data)} bytes is too short for a WebP image")
    head = bytes(data[:30])
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise ValueError("not a WebP image (no RIFF/WEBP header)")
    (riff_size,) = struct.unpack_from("<I", head, 4)
    if riff_size + 8 > len(data):
        raise ValueError(f"truncated WebP image: RIFF says {riff_size + 8} bytes, got {len(data)}")
    chunk = head[12:16]
    if chunk == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        w, h = struct.unpack_from("<HH", head, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if head[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        (bits,) = struct.unpack_from("<I", head, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    raise ValueError(f"unknown WebP chunk {chunk!r}")


#: The environment variable holding the token a worker presents to ``/ws/gpu``.
AUTH_TOKEN_ENV = "DREAM_GEN_AUTH_TOKEN"
DEFAULT_PROMPT = "a quiet dream of drifting light"


class DreamState(msgspec.Struct, kw_only=True):
    """What a worker saves (0x02) and restores (0x14)."""

    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    #: Number of the next frame to generate.
    frame_number: int = 1
    keyframe_number: int = 0
    generator: str = "testcard"
