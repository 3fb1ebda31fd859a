"""Bounds on an SDP offer, checked before aiortc parses it.

aiortc's parser and its negotiation are quadratic in the number of media sections, and they run
on signalling's event loop: one offer of 1000 m-lines held every API call and every live stream
for seconds. A browser's offer has a few sections (video, maybe audio, the data channel) and a
few hundred lines; the bounds sit far above that and far below the harm. A malformed number is
reported with its line, not Python's message.
"""

from __future__ import annotations

from services.inference.catalog import ParameterError

#: Scope's 0.2 UI offers 3 sections; a page with several sources a handful more.
MAX_MEDIA_SECTIONS = 16
#: Chromium's offer with every codec is about 120 lines per video section.
MAX_LINES = 2000
MAX_LINE_CHARS = 4096
MAX_SDP_BYTES = 128 * 1024
_PAYLOAD_ATTRIBUTES = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")


class OfferTooLarge(ParameterError):
    """An offer past :data:`MAX_SDP_BYTES`, :data:`MAX_LINES` or :data:`MAX_MEDIA_SECTIONS`."""


def check_offer(sdp: str) -> None:
    """Raise :class:`ParameterError` (``"sdp: …"``) for an offer too large or malformed to parse."""
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size > MAX_SDP_BYTES:
        raise OfferTooLarge(f"sdp: {size} bytes, more than the {MAX_SDP_BYTES} an offer may have")
    lines = sdp.splitlines()
    if len(lines) > MAX_LINES:
        raise OfferTooLarge(f"sdp: {len(lines)} lines, more than the {MAX_LINES} allowed")
    sections = 0
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_CHARS:
            raise OfferTooLarge(f"sdp: line {number} is longer than {MAX_LINE_CHARS} characters")
        if line.startswith("m="):
            sections += 1
            if sections > MAX_MEDIA_SECTIONS:
                raise OfferTooLarge(
                    f"sdp: more than {MAX_MEDIA_SECTIONS} media sections (m= lines)"
                )
            _check_media_line(number, line)
        elif line.startswith(_PAYLOAD_ATTRIBUTES):
            value = line.split(":", 1)[1].split(" ", 1)[0]
            if value != "*" and not _is_payload_type(value):
                attribute = line.split(":", 1)[0]
                raise ParameterError(
                    f"sdp: line {number} ({attribute}): payload type {value!r} is not a number "
                    "from 0 to 127"
                )


def _is_payload_type(value: str) -> bool:
    return value.isascii() and value.isdigit() and int(value) <= 127


def _check_media_line(number: int, line: str) -> None:
    """``m=<media> <port> <proto> <fmt> …``: an RTP section's formats are payload types."""
    parts = line[2:].split()
    if len(parts) < 3:
        raise ParameterError(f"sdp: line {number} (m=): expected media, port, protocol, formats")
    port = parts[1].split("/", 1)[0]
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ParameterError(f"sdp: line {number} (m=): port {parts[1]!r} is not a port")
    if "RTP" in parts[2]:
        for fmt in parts[3:]:
            if not _is_payload_type(fmt):
                raise ParameterError(
                    f"sdp: line {number} (m=): payload type {fmt!r} is not a number from 0 to 127"
                )
