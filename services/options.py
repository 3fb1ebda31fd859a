"""What each kind of media service is started with: one typed Struct per kind, each default
written once. The supervisor fills them from the config tree (``[encode]``, ``[decode]``, the
pipelines) and sends them in ``ServiceSpec.options``; a service converts its own, so a key it
does not know, or a value of the wrong type, fails its start with the key's name.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.hwcodec import Hardware
from services.overlay.config import PIPELINE_ID as OVERLAY_PIPELINE_ID
from services.topology import SIGNALLING

#: Encoder bitrates (bits per second): where a session starts and the range REMB moves it in.
#: 1 Mbps suits 512x512 to 720p VP8 at 30 fps; aiortc starts at 0.5 and caps at 1.5.
START_BITRATE_BPS = 1_000_000
MIN_BITRATE_BPS = 250_000
MAX_BITRATE_BPS = 3_000_000
#: As aiortc's VP8 ``kf_max_dist``: a keyframe this often at most; PLI asks for the rest.
KEYFRAME_INTERVAL_FRAMES = 3000
#: Who hears a stage's results and errors, and asks for keyframes.
#: The most frames a second a text-mode session gets from an inference process.
TEXT_FPS = 30.0


class EncodeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    start_bitrate_bps: int = START_BITRATE_BPS
    min_bitrate_bps: int = MIN_BITRATE_BPS
    max_bitrate_bps: int = MAX_BITRATE_BPS
    keyframe_interval_frames: int = KEYFRAME_INTERVAL_FRAMES
    #: ``auto``: NVENC for H.264 where it opens (:mod:`services.hwcodec`); ``off``: the CPU.
    hardware: Hardware = "auto"


GIB = 2**30


class RecordingOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[recording]`` in the config."""

    #: Where the files go; "": ``recordings/`` in the run directory.
    dir: str = ""
    #: One file's limits: it ends there (a stop that never comes).
    max_bytes: int = 2 * GIB
    max_seconds: float = 3600.0
    #: How long a finished file stays downloadable.
    keep_s: float = 3600.0
    #: Every kept and growing file together.
    max_total_bytes: int = 10 * GIB
    #: No recording starts, and one ends, when the disk has less free than this.
    min_free_bytes: int = 1 * GIB


class DecodeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The service told when the decoder needs a keyframe (it sends the peer a PLI).
    keyframe_target: str = SIGNALLING
    #: ``auto``: NVDEC where it opens; ``off``: the CPU.
    hardware: Hardware = "auto"


class InferenceOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The pipeline id; None: the part of the service name after ``/``.
    pipeline: str | None = None
    #: The load-time config, as ``POST /api/v1/pipeline/load`` gives it.
    load_params: dict[str, Any] = {}
    #: None: ``services.models.store.default_models_dir()``.
    models_dir: str | None = None
    #: The service that hears per-frame results and errors as ``StageOutput``.
    notify: str = SIGNALLING
    text_fps: float = TEXT_FPS
    #: The device of a per-device process (``cuda:N``: started with ``CUDA_VISIBLE_DEVICES=N``;
    #: ``cpu:N``: a stand-in for tests); None: the pipeline picks its device.
    device: str | None = None


class OverlayOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The overlay service's options (``[[services]] options`` / set by the supervisor)."""

    #: The pipeline id (the supervisor names it for inference-like services).
    pipeline: str = OVERLAY_PIPELINE_ID
    #: None: ``services.models.store.default_models_dir()``.
    models_dir: str | None = None
    #: ``module:callable`` building a stand-in with Moondream's four methods; None = Moondream.
    model: str | None = None
    #: Keyword arguments for ``model``.
    model_options: dict[str, Any] = {}
    #: Load parameters (``compile_model``) as ``POST /api/v1/pipeline/load`` gives them.
    load_params: dict[str, Any] = {}
    #: A result older than this (from the frame it was computed on) is not drawn; 0 = no limit.
    max_result_age_s: float = 5.0
