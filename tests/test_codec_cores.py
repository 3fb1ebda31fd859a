"""Decoder and Encoder with real PyAV codecs: round trips, errors, keyframes, bitrate."""

from collections.abc import Iterator

import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder, h264_depayload
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload

from services.decode.decoder import Decoder
from services.encode.encoder import EncodedPacket, Encoder
from services.testpattern import draw_frame_number, read_frame_number

CODECS = ["VP8", "H264"]
FRAME_TICKS = 3000  # 1/30 s at 90 kHz


def _frames(width: int, height: int, count: int, start: int = 0) -> Iterator[np.ndarray]:
    """Moving gradient with the frame number drawn in; a fresh array per frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    for n in range(start, start + count):
        rgb = np.empty((height, width, 3), np.uint8)
        rgb[..., 0] = (xx + 4 * n) % 256
        rgb[..., 1] = (yy + 2 * n) % 256
        rgb[..., 2] = 128
        draw_frame_number(rgb, n)
        yield rgb


def _noisy_frames(width: int, height: int, count: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(7)
    for rgb in _frames(width, height, count):
        noise = rng.integers(-24, 25, rgb.shape)
        yield np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _encode_all(
    encoder: Encoder, frames: Iterator[np.ndarray], start: int = 0
) -> list[EncodedPacket]:
    packets = []
    for n, rgb in enumerate(frames, start):
        packets += encoder.encode(rgb, n * FRAME_TICKS)
    return packets


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_keeps_frame_numbers_in_order(codec: str) -> None:
    encoder = Encoder(codec, 512, 512)
    decoder = Decoder(codec, 512, 512)
    packets = _encode_all(encoder, _frames(512, 512, 40))
    assert len(packets) == 40
    assert packets[0].keyframe
    assert not any(p.keyframe for p in packets[1:])
    assert [p.pts for p in packets] == [n * FRAME_TICKS for n in range(40)]

    decoded = [f for p in packets for f in decoder.decode(p.data, p.pts)]
    assert [read_frame_number(f.rgb) for f in decoded] == list(range(40))
    assert [f.pts for f in decoded] == [p.pts for p in packets]
    assert [f.keyframe for f in decoded] == [p.keyframe for p in packets]
    assert all(f.rgb.shape == (512, 512, 3) and f.rgb.dtype == np.uint8 for f in decoded)
    assert not decoder.needs_keyframe()
    stats = decoder.stats()
    assert (stats.frames_in, stats.frames_out, stats.errors) == (40, 40, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_packets_go_through_aiortc_packetizer(codec: str) -> None:
    """What aiortc's sender does with pack() and its receiver with depayload, then decode."""
    packer = Vp8Encoder() if codec == "VP8" else H264Encoder()
    depayload = vp8_depayload if codec == "VP8" else h264_depayload
    encoder = Encoder(codec, 512, 512)
    decoder = Decoder(codec, 512, 512)
    numbers = []
    for packet in _encode_all(encoder, _noisy_frames(512, 512, 10)):
        payloads, timestamp = packer.pack(packet.to_av_packet())
        assert timestamp == packet.pts
        assert all(len(p) <= 1300 for p in payloads)
        data = b"".join(depayload(p) for p in payloads)
        numbers += [read_frame_number(f.rgb) for f in decoder.decode(data, timestamp)]
    assert numbers == list(range(10))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_decode_scales_to_session_resolution(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    decoder = Decoder(codec, 512, 512)
    packets = _encode_all(encoder, _frames(320, 240, 10))
    decoded = [f for p in packets for f in decoder.decode(p.data, p.pts)]
    assert [f.rgb.shape for f in decoded] == [(512, 512, 3)] * 10
    assert [read_frame_number(f.rgb) for f in decoded] == list(range(10))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_decode_into_caller_array(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    decoder = Decoder(codec, 256, 192)
    slots = np.zeros((3, 192, 256, 3), np.uint8)  # stands in for a shared-memory ring
    calls: list[tuple[int, int]] = []

    def out(height: int, width: int) -> np.ndarray:
        calls.append((height, width))
        return slots[len(calls) - 1]

    for n, packet in enumerate(_encode_all(encoder, _frames(320, 240, 3))):
        (frame,) = decoder.decode(packet.data, packet.pts, out=out)
        assert np.shares_memory(frame.rgb, slots[n])
    assert calls == [(192, 256)] * 3
    assert [read_frame_number(slot) for slot in slots] == [0, 1, 2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_frames_before_keyframe_request_one_then_decoding_starts(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    decoder = Decoder(codec, 320, 240)
    packets = _encode_all(encoder, _frames(320, 240, 6))
    assert decoder.needs_keyframe()  # nothing received yet
    assert not decoder.needs_keyframe()  # reading clears it

    # Joining late: delta frames only.
    for packet in packets[3:]:
        assert decoder.decode(packet.data, packet.pts) == []
        assert decoder.needs_keyframe()

    encoder.request_keyframe()
    later = _encode_all(encoder, _frames(320, 240, 3, start=6), start=6)
    assert later[0].keyframe
    decoded = [f for p in later for f in decoder.decode(p.data, p.pts)]
    assert [read_frame_number(f.rgb) for f in decoded] == [6, 7, 8]
    assert not decoder.needs_keyframe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_data_requests_keyframe_and_session_recovers(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    decoder = Decoder(codec, 320, 240)
    packets = _encode_all(encoder, _frames(320, 240, 4))
    assert len(decoder.decode(packets[0].data, packets[0].pts)) == 1
    assert not decoder.needs_keyframe()

    garbage = np.random.default_rng(3).integers(0, 256, 800, dtype=np.uint8).tobytes()
    bad_payloads = [
        garbage,
        b"\x00\x00\x00\x01\x65" + garbage,  # an H.264 IDR slice header followed by noise
        b"",
        b"\x00",
    ]
    for payload in bad_payloads:
        assert decoder.decode(payload, 123) == []
        assert decoder.needs_keyframe()
    assert decoder.stats().errors == len(bad_payloads)

    encoder.request_keyframe()
    later = _encode_all(encoder, _frames(320, 240, 3, start=4), start=4)
    decoded = [f for p in later for f in decoder.decode(p.data, p.pts)]
    assert [read_frame_number(f.rgb) for f in decoded] == [4, 5, 6]
    assert decoded[0].keyframe


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_request_keyframe_makes_next_packet_a_keyframe(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    frames = _frames(320, 240, 12)
    flags = []
    for n, rgb in enumerate(frames):
        if n in (5, 9):
            encoder.request_keyframe()
        (packet,) = encoder.encode(rgb, n * FRAME_TICKS, force_keyframe=n == 7)
        flags.append(packet.keyframe)
    assert [n for n, key in enumerate(flags) if key] == [0, 5, 7, 9]


@pytest.mark.timeout(60)
def test_h264_keyframes_carry_sps_and_pps_for_late_joiners() -> None:
    encoder = Encoder("H264", 320, 240)
    packets = _encode_all(encoder, _frames(320, 240, 8))
    encoder.request_keyframe()
    packets += _encode_all(encoder, _frames(320, 240, 4, start=8), start=8)
    for packet in packets:
        nal_types = {nal[0] & 0x1F for nal in packet.data.split(b"\x00\x00\x01")[1:]}
        assert packet.data.startswith(b"\x00\x00\x00\x01")  # Annex-B
        if packet.keyframe:
            assert {7, 8, 5} <= nal_types  # SPS, PPS, IDR slice
            sps = packet.data[packet.data.index(b"\x00\x00\x01\x67") + 4 :]
            assert sps[0] == 66  # profile_idc: baseline
            assert sps[1] & 0x40  # constraint_set1: constrained baseline
        else:
            assert nal_types == {1}  # non-IDR slices only, no B-frames reordering
    # A decoder joining at the second keyframe decodes everything from there.
    decoder = Decoder("H264", 320, 240)
    decoded = [f for p in packets[8:] for f in decoder.decode(p.data, p.pts)]
    assert [read_frame_number(f.rgb) for f in decoded] == [8, 9, 10, 11]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_lower_bitrate_gives_smaller_packets(codec: str) -> None:
    def delta_bytes(bitrate: int) -> float:
        encoder = Encoder(
            codec, 512, 512, bitrate_bps=bitrate, min_bitrate_bps=200_000, max_bitrate_bps=4_000_000
        )
        packets = _encode_all(encoder, _noisy_frames(512, 512, 30))
        return float(np.mean([len(p.data) for p in packets if not p.keyframe]))

    assert delta_bytes(200_000) < 0.5 * delta_bytes(4_000_000)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_set_bitrate_takes_effect_with_a_keyframe(codec: str) -> None:
    encoder = Encoder(codec, 512, 512, bitrate_bps=3_000_000)
    frames = list(_noisy_frames(512, 512, 60))
    high = _encode_all(encoder, iter(frames[:30]))
    assert encoder.set_bitrate(100) == encoder.min_bitrate_bps  # clamped
    low = _encode_all(encoder, iter(frames[30:]), start=30)
    assert low[0].keyframe  # the encoder was recreated
    assert not any(p.keyframe for p in low[1:])
    assert [read_frame_number(_decode_one(codec, low[0].data))] == [30]

    def mean_delta(packets: list[EncodedPacket]) -> float:
        return float(np.mean([len(p.data) for p in packets[1:]]))

    assert mean_delta(low) < 0.5 * mean_delta(high)

    # Small changes (within 10%) keep the running encoder: no extra keyframe.
    assert encoder.set_bitrate(10**9) == encoder.max_bitrate_bps
    (packet,) = encoder.encode(frames[0], 60 * FRAME_TICKS)
    assert packet.keyframe
    encoder.set_bitrate(int(encoder.max_bitrate_bps * 0.95))
    (packet,) = encoder.encode(frames[1], 61 * FRAME_TICKS)
    assert not packet.keyframe
    assert encoder.bitrate_bps == int(encoder.max_bitrate_bps * 0.95)


def _decode_one(codec: str, data: bytes) -> np.ndarray:
    (frame,) = Decoder(codec, 128, 128).decode(data, 0)
    return frame.rgb


@pytest.mark.timeout(60)
def test_sessions_are_independent() -> None:
    enc_a, enc_b = Encoder("VP8", 320, 240), Encoder("H264", 256, 256)
    dec_a, dec_b = Decoder("VP8", 320, 240), Decoder("H264", 512, 512)
    assert dec_a.needs_keyframe() and dec_b.needs_keyframe()

    frames_a, frames_b = _frames(320, 240, 10), _frames(256, 256, 10, start=100)
    read_a, read_b = [], []
    for n, (rgb_a, rgb_b) in enumerate(zip(frames_a, frames_b, strict=True)):
        if n == 5:
            enc_a.request_keyframe()
            assert dec_b.decode(b"junk", 0) == []
        (pa,) = enc_a.encode(rgb_a, n * FRAME_TICKS)
        (pb,) = enc_b.encode(rgb_b, n * FRAME_TICKS)
        assert pa.keyframe == (n in (0, 5))
        assert pb.keyframe == (n == 0)
        read_a += [read_frame_number(f.rgb) for f in dec_a.decode(pa.data, pa.pts)]
        read_b += [read_frame_number(f.rgb) for f in dec_b.decode(pb.data, pb.pts)]
        if n == 5:
            assert not dec_a.needs_keyframe()
            assert dec_b.needs_keyframe()
    assert read_a == list(range(10))
    assert read_b == list(range(100, 110))


@pytest.mark.timeout(60)
def test_a_bad_codec_size_or_frame_is_a_clear_error() -> None:
    for codec_class in (Encoder, Decoder):
        with pytest.raises(ValueError, match="codec"):
            codec_class("AV1", 320, 240)
        with pytest.raises(ValueError, match="even"):
            codec_class("H264", 321, 240)
    with pytest.raises(ValueError, match="bitrate range"):
        Encoder("VP8", 320, 240, min_bitrate_bps=2, max_bitrate_bps=1)
    with pytest.raises(ValueError, match="uint8"):
        Encoder("VP8", 320, 240).encode(np.zeros((240, 320), np.uint8), 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_encode_scales_and_accepts_strided_input(codec: str) -> None:
    encoder = Encoder(codec, 320, 240)
    decoder = Decoder(codec, 320, 240)
    big = next(_frames(640, 480, 1, start=9))
    packets = encoder.encode(big, 0)  # other size: scaled
    strided = np.zeros((240, 640, 3), np.uint8)[:, ::2]
    strided[...] = next(_frames(320, 240, 1, start=10))
    packets += encoder.encode(strided, FRAME_TICKS)  # rows not contiguous
    decoded = [f for p in packets for f in decoder.decode(p.data, p.pts)]
    assert [read_frame_number(f.rgb) for f in decoded] == [9, 10]
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((240, 320), np.uint8), 0)


def test_without_a_gpu_codec_the_cpu_one_runs_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import hwcodec

    hwcodec.usable.cache_clear()
    with caplog.at_level("INFO", logger="services.hwcodec"):
        chosen = hwcodec.encoder("H264", "auto")
    if chosen is not None:
        pytest.skip(f"{chosen} opens on this machine")
    assert "h264_nvenc" in caplog.text and "the CPU codec runs" in caplog.text
    # The CPU codecs then carry the session, frame numbers intact.
    enc, dec = Encoder("H264", 128, 96, hardware="auto"), Decoder("H264", 128, 96, hardware="auto")
    numbers = []
    for n in range(5):
        rgb = np.zeros((96, 128, 3), np.uint8)
        draw_frame_number(rgb, n)
        for packet in enc.encode(rgb, n * 3000):
            numbers += [read_frame_number(f.rgb) for f in dec.decode(packet.data, packet.pts)]
    assert numbers == [0, 1, 2, 3, 4]

    def never(name: str, mode: str) -> bool:
        raise AssertionError(f"probed {name} although hardware is off")

    monkeypatch.setattr(hwcodec, "usable", never)
    assert hwcodec.encoder("H264", "off") is None and hwcodec.decoder("VP8", "off") is None
