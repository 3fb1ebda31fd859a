"""GPU video codecs when the machine has them: NVENC for H.264 encode, NVDEC (FFmpeg's
``*_cuvid``) for VP8 and H.264 decode, through PyAV's FFmpeg.

``hardware = "auto"`` (the default of ``[encode]`` and ``[decode]``) uses one when PyAV's
FFmpeg has it *and* it opens here (a driver and a GPU): :func:`usable` opens a tiny context
once per codec and remembers the answer. Otherwise the CPU codec runs, and the first time the
log says why (``"h264_nvenc unavailable (…): H264 on the CPU"``). VP8 has no NVENC: VP8 encode
is always libvpx.
"""

from __future__ import annotations

import fractions
import functools
import logging
from typing import Literal

import av
from av.video.codeccontext import VideoCodecContext

logger = logging.getLogger(__name__)

Hardware = Literal["auto", "off"]

ENCODERS = {"H264": "h264_nvenc"}
DECODERS = {"H264": "h264_cuvid", "VP8": "vp8_cuvid"}


@functools.cache
def usable(name: str, mode: Literal["r", "w"]) -> bool:
    """Whether FFmpeg's codec ``name`` exists in this PyAV and opens on this machine."""
    if name not in av.codecs_available:
        logger.info("%s is not in this PyAV's FFmpeg: the CPU codec runs", name)
        return False
    try:
        context = av.CodecContext.create(name, mode)
        if mode == "w":
            assert isinstance(context, VideoCodecContext)
            context.width, context.height = 64, 64
            context.pix_fmt = "yuv420p"
            context.time_base = fractions.Fraction(1, 30)
        context.open()
    except Exception as exc:
        logger.info("%s unavailable (%s): the CPU codec runs", name, str(exc).strip() or exc)
        return False
    logger.info("%s opens here: GPU video codec in use", name)
    return True


def encoder(codec: str, hardware: Hardware) -> str | None:
    """The GPU encoder to use for ``codec``, or None for the CPU one."""
    name = ENCODERS.get(codec)
    return name if hardware == "auto" and name is not None and usable(name, "w") else None


def decoder(codec: str, hardware: Hardware) -> str | None:
    """The GPU decoder to use for ``codec``, or None for the CPU one."""
    name = DECODERS.get(codec)
    return name if hardware == "auto" and name is not None and usable(name, "r") else None
