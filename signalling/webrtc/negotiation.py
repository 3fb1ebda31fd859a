"""Video codec negotiation: VP8 and H264 both negotiable, the client's order respected.

aiortc answers with the common codecs in the order of the offer's ``a=rtpmap`` lines and sends
with the first one. The offerer's preference is really the order of the payload types on the
``m=video`` line (RFC 3264 5.1), which browsers usually, but not necessarily, repeat in their
rtpmap lines. :func:`prefer_video_codecs` sets the transceiver's codec preferences from the
``m=`` line, limited to what the encode process can produce; call it on a transceiver added
*before* ``setRemoteDescription`` (aiortc negotiates inside that call).

After ``setRemoteDescription`` (answerer) :func:`negotiated_video_codec` says which codec the
sender will use, i.e. what the encode process must produce for this session.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.sdp import SessionDescription

SUPPORTED_VIDEO_CODECS = ("VP8", "H264")


def _is_rtx(name: str) -> bool:
    return name.lower() == "rtx"


def offered_video_codecs(offer_sdp: str) -> list[str]:
    """Codec names of the offer's first video section, most preferred first, RTX left out."""
    session = SessionDescription.parse(offer_sdp)
    for media in session.media:
        if media.kind != "video":
            continue
        by_pt = {codec.payloadType: codec.name for codec in media.rtp.codecs}
        names: list[str] = []
        for pt in media.fmt:
            name = by_pt.get(pt) if isinstance(pt, int) else None
            if name is not None and not _is_rtx(name) and name not in names:
                names.append(name)
        return names
    return []


def video_codec_preferences(order: Sequence[str]) -> list[RTCRtpCodecCapability]:
    """aiortc codec capabilities for ``order`` (names, most preferred first), plus RTX."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    preferences: list[RTCRtpCodecCapability] = []
    for name in order:
        matching = [c for c in capabilities if c.name.lower() == name.lower()]
        if not matching:
            raise ValueError(f"aiortc cannot negotiate video codec {name!r}")
        preferences.extend(matching)
    preferences.extend(c for c in capabilities if _is_rtx(c.name))
    return preferences


def prefer_video_codecs(
    transceiver: RTCRtpTransceiver,
    offer_sdp: str,
    supported: Sequence[str] = SUPPORTED_VIDEO_CODECS,
    preferred: str | None = None,
) -> str:
    """Limit ``transceiver`` to ``supported`` codecs, in the offer's order but ``preferred``
    first when offered; returns the one aiortc will pick. Raises ``ValueError`` when the offer
    has none of them."""
    wanted = {name.upper() for name in supported}
    offered = offered_video_codecs(offer_sdp)
    order = [name for name in offered if name.upper() in wanted]
    if preferred is not None:
        order.sort(
            key=lambda name: name.upper() != preferred.upper()
        )  # stable: the rest keep order
    if not order:
        raise ValueError(
            f"offer has no usable video codec (offered {offered or 'none'}, "
            f"supported {list(supported)})"
        )
    transceiver.setCodecPreferences(video_codec_preferences(order))
    return order[0]


def negotiated_video_codec(transceiver: RTCRtpTransceiver) -> RTCRtpCodecParameters | None:
    """The codec the transceiver's sender will send with, once negotiated (after
    ``setRemoteDescription`` on the answerer); ``None`` before. Its ``name`` is ``"VP8"`` or
    ``"H264"``; for H264, ``parameters`` carry ``profile-level-id`` and ``packetization-mode``.
    """
    codecs: list[RTCRtpCodecParameters] = getattr(transceiver, "_codecs", [])
    return next((codec for codec in codecs if not _is_rtx(codec.name)), None)
