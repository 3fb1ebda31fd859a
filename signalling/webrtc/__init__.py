"""aiortc glue for signalling: encoded frames in, pre-encoded packets out, no codec work.

- :mod:`.forwarding`: receivers hand over encoded frames (:func:`forward_encoded`), a drain
  task keeps aiortc's unbounded queue empty, PLIs go upstream on decode failure.
- :mod:`.packet_track`: :class:`EncodedVideoTrack`, packets from the encode process, with
  keyframe-request and bitrate feedback.
- :mod:`.negotiation`: VP8/H264 preferences per offer and the negotiated codec.
"""

from signalling.webrtc.forwarding import (
    EncodedFrameForwarder,
    EncodedVideoFrame,
    FrameDrain,
    forward_encoded,
    forwarder_of,
    receive_encoded,
    request_keyframe_upstream,
    start_drain,
)
from signalling.webrtc.negotiation import (
    SUPPORTED_VIDEO_CODECS,
    negotiated_video_codec,
    offered_video_codecs,
    prefer_video_codecs,
    video_codec_preferences,
)
from signalling.webrtc.packet_track import EncodedVideoTrack, KeyframeReason

__all__ = [
    "SUPPORTED_VIDEO_CODECS",
    "EncodedFrameForwarder",
    "EncodedVideoFrame",
    "EncodedVideoTrack",
    "FrameDrain",
    "KeyframeReason",
    "forward_encoded",
    "forwarder_of",
    "negotiated_video_codec",
    "offered_video_codecs",
    "prefer_video_codecs",
    "receive_encoded",
    "request_keyframe_upstream",
    "start_drain",
    "video_codec_preferences",
]
