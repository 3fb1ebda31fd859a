import fractions

import av
import numpy as np
import pytest
from av.video.frame import VideoFrame

from services.testpattern import PATTERN_MODULUS, draw_frame_number, read_frame_number


def _background(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 12345, 0x5555, 0xAAAA, PATTERN_MODULUS - 1])
@pytest.mark.parametrize("shape", [(512, 512), (240, 320), (720, 1280), (24, 16)])
def test_round_trip(n: int, shape: tuple[int, int]) -> None:
    rgb = _background(*shape)
    draw_frame_number(rgb, n)
    assert read_frame_number(rgb) == n


@pytest.mark.timeout(60)
def test_number_is_stored_modulo_2_16() -> None:
    rgb = _background(64, 64)
    draw_frame_number(rgb, PATTERN_MODULUS + 42)
    assert read_frame_number(rgb) == 42


@pytest.mark.timeout(60)
def test_only_the_top_third_is_drawn() -> None:
    rgb = _background(300, 200)
    before = rgb.copy()
    draw_frame_number(rgb, 77)
    np.testing.assert_array_equal(rgb[100:], before[100:])
    assert not np.array_equal(rgb[:100], before[:100])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [0, 128, 255])
def test_frames_without_the_pattern_read_none(value: int) -> None:
    assert read_frame_number(np.full((240, 320, 3), value, np.uint8)) is None


@pytest.mark.timeout(60)
def test_random_content_reads_none() -> None:
    for seed in range(20):
        assert read_frame_number(_background(240, 320, seed)) is None


@pytest.mark.timeout(60)
def test_a_flipped_cell_reads_none() -> None:
    rgb = np.zeros((240, 320, 3), np.uint8)
    draw_frame_number(rgb, 0x1234)
    # Invert the top-left cell (data bit 15) without touching its complement.
    rgb[:20, :40] = 255 - rgb[:20, :40]
    assert read_frame_number(rgb) is None


@pytest.mark.timeout(60)
def test_grey_cell_reads_none() -> None:
    rgb = np.zeros((240, 320, 3), np.uint8)
    draw_frame_number(rgb, 0x1234)
    rgb[20:40, 40:80] = 128
    assert read_frame_number(rgb) is None


@pytest.mark.timeout(60)
def test_survives_noise() -> None:
    rgb = _background(240, 320)
    draw_frame_number(rgb, 4321)
    noise = np.random.default_rng(1).integers(-40, 41, rgb.shape)
    noisy = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    assert read_frame_number(noisy) == 4321


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dst", [(512, 512), (120, 160), (1080, 1920), (48, 32)])
def test_survives_scaling(dst: tuple[int, int]) -> None:
    rgb = _background(240, 320)
    draw_frame_number(rgb, 999)
    scaled = (
        VideoFrame.from_ndarray(rgb, format="rgb24")
        .reformat(width=dst[1], height=dst[0], interpolation="BICUBIC")
        .to_ndarray()
    )
    assert scaled.shape == (*dst, 3)
    assert read_frame_number(scaled) == 999


@pytest.mark.timeout(60)
def test_survives_lossy_coding_at_low_bitrate() -> None:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.bit_rate = 100_000
    encoder.time_base = fractions.Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    decoder = av.CodecContext.create("h264", "r")
    numbers = []
    for i in range(20):
        rgb = _background(240, 320, i)
        draw_frame_number(rgb, 1000 + i)
        frame = VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = i
        for packet in encoder.encode(frame):
            for decoded in decoder.decode(packet):
                numbers.append(read_frame_number(decoded.to_ndarray(format="rgb24")))
    assert numbers == [1000 + i for i in range(20)]


@pytest.mark.timeout(60)
def test_works_on_strided_views() -> None:
    big = _background(480, 640)
    view = big[::2, ::2]
    draw_frame_number(view, 31337)
    assert read_frame_number(view) == 31337


@pytest.mark.timeout(60)
def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        draw_frame_number(np.zeros((240, 320), np.uint8), 1)
    with pytest.raises(ValueError):
        draw_frame_number(np.zeros((240, 320, 3), np.float32), 1)
    with pytest.raises(ValueError):
        draw_frame_number(np.zeros((8, 8, 3), np.uint8), 1)
    with pytest.raises(ValueError):
        draw_frame_number(np.zeros((240, 320, 3), np.uint8), -1)
    with pytest.raises(ValueError):
        read_frame_number(np.zeros((240, 320, 4), np.uint8))
