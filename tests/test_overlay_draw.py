"""Overlays are drawn where the result says, as the reference draws them (pixel checks)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFont

from services.overlay.config import MoondreamFeature as F
from services.overlay.draw import (
    BOX_COLOR,
    POINT_COLOR,
    build_plan,
    font,
    text_bitmap,
    wrap_text,
)

pytestmark = pytest.mark.timeout(30)

W = H = 512
BG = 128


def frame(w: int = W, h: int = H) -> np.ndarray:
    return np.full((h, w, 3), BG, np.uint8)


def draw(
    feature: F, result: dict, opacity: float = 1.0, font_scale: float = 1.0, w: int = W, h: int = H
) -> np.ndarray:
    out = frame(w, h)
    build_plan(feature, result, w, h, opacity, font_scale).draw(out)
    return out


def blend(dst: int, color: int, alpha: float) -> int:
    a = round(alpha * 256)
    return (dst * (256 - a) + color * a) >> 8


BOX = {"x_min": 0.25, "y_min": 0.25, "x_max": 0.75, "y_max": 0.75}


def test_green_box_edges_at_the_box_coordinates() -> None:
    out = draw(F.DETECT, {"objects": [BOX]})
    x1 = y1 = int(0.25 * W)
    x2 = y2 = int(0.75 * W)
    green = np.array(BOX_COLOR)
    for y, x in [(y1, 300), (y1 + 1, 300), (y2, 300), (y2 - 1, 300), (300, x1), (300, x2)]:
        assert (out[y, x] == green).all(), (y, x, out[y, x])
    # Outline 2 px wide, drawn inwards; outside the box the frame is untouched.
    assert (out[300, x1 - 1] == BG).all() and (out[y2 + 1, 300] == BG).all()
    # Filled at 40/255: a green tint inside.
    inside = out[300, 300]
    assert tuple(inside) == (
        blend(BG, 0, 40 / 255),
        blend(BG, 220, 40 / 255),
        blend(BG, 0, 40 / 255),
    )
    # "#1" label: black box above the top-left corner, green text in it.
    label = out[y1 - 14 : y1, x1 : x1 + 20]
    assert (label == 0).all(axis=-1).any()
    assert (label[..., 1] > 150).any() and (label[..., 0] < 60).all()
    assert (out[: y1 - 25] == BG).all()


def test_box_labels_numbered_and_below_when_no_room_above() -> None:
    top = {"x_min": 0.1, "y_min": 0.0, "x_max": 0.3, "y_max": 0.2}
    out = draw(F.DETECT, {"objects": [BOX, top]})
    y2 = int(0.2 * H)
    below = out[y2 + 1 : y2 + 16, int(0.1 * W) : int(0.1 * W) + 20]
    assert (below == 0).all(axis=-1).any()  # label 2's black background is under the box
    two, one = text_bitmap("#2", 16).mask, text_bitmap("#1", 16).mask
    assert two.shape[0] > 0 and not np.array_equal(one, two)


def test_red_dot_at_the_point_with_white_outline_and_label() -> None:
    out = draw(F.POINT, {"points": [{"x": 0.5, "y": 0.5}]})
    cx, cy = W // 2, H // 2
    assert tuple(out[cy, cx]) == POINT_COLOR
    radius = 6
    assert (out[cy, cx - radius] == 255).all()  # white outline on the left edge
    assert (out[cy, cx - radius - 1] == BG).all()
    label = out[cy - radius : cy + 10, cx + radius + 3 : cx + radius + 25]
    assert (label[..., 0] > 180).any() and (label[..., 1] < BG).any()


def test_caption_bar_darkens_the_bottom_and_holds_white_text() -> None:
    out = draw(F.CAPTION, {"caption": "A person sitting at a desk."}, opacity=0.8)
    line_height = int(font(16).getbbox("Ag")[3]) + 4
    bar_height = line_height + 16
    bar = out[H - bar_height :]
    dark = blend(BG, 0, 180 / 255 * 0.8)
    assert (bar[:, -5:] == dark).all()  # right end of the bar: no text there
    assert (out[: H - bar_height] == BG).all()  # above the bar: untouched
    assert bar.max() > 200  # white text
    assert (bar[:, :8] == dark).all()  # 10 px margin


def test_query_shows_question_then_answer_lines() -> None:
    out = draw(F.QUERY, {"question": "How many people?", "answer": "Three."})
    line_height = int(font(16).getbbox("Ag")[3]) + 4
    bar_height = 2 * line_height + 16
    assert (out[H - bar_height - 1] == BG).all()
    assert (out[H - bar_height] < BG).all()
    rows_with_text = np.nonzero((out[H - bar_height :] > 200).any(axis=(1, 2)))[0]
    assert rows_with_text.max() - rows_with_text.min() > line_height  # two lines of text


def test_text_wraps_to_the_frame_width_and_the_bar_is_capped() -> None:
    words = "the quick brown fox jumps over the lazy dog " * 40
    lines = wrap_text(words, 16, W - 20)
    assert len(lines) > 10
    assert all(font(16).getlength(line) <= W - 20 for line in lines)
    assert " ".join(lines) == " ".join(words.split())
    long_word = "x" * 400
    pieces = wrap_text(long_word, 16, 200)
    assert "".join(pieces) == long_word and all(font(16).getlength(s) <= 200 for s in pieces)
    out = draw(F.CAPTION, {"caption": words})
    assert (out[: H - H // 3] == BG).all()  # at most a third of the frame
    assert (out[H - H // 3 :, -3:] < BG).all()


def test_opacity_and_font_scale_are_honoured() -> None:
    assert (draw(F.DETECT, {"objects": [BOX]}, opacity=0.0) == BG).all()
    assert (draw(F.CAPTION, {"caption": "hello"}, opacity=0.0) == BG).all()
    half = draw(F.DETECT, {"objects": [BOX]}, opacity=0.5)
    assert half[int(0.25 * H), 300, 1] == blend(BG, 220, 0.5)
    big = draw(F.POINT, {"points": [{"x": 0.5, "y": 0.5}]}, font_scale=2.0)
    assert tuple(big[H // 2, W // 2 - 10]) == POINT_COLOR  # radius 12 instead of 6
    small = draw(F.POINT, {"points": [{"x": 0.5, "y": 0.5}]}, font_scale=1.0)
    assert tuple(small[H // 2, W // 2 - 10]) == (BG, BG, BG)


def test_shapes_off_the_frame_are_clipped_and_other_sizes_work() -> None:
    wild = {"x_min": -0.2, "y_min": 0.9, "x_max": 1.3, "y_max": 1.5}
    out = draw(F.DETECT, {"objects": [wild]}, w=1280, h=720)
    assert out.shape == (720, 1280, 3)
    assert (out[int(0.9 * 720), 640] == BOX_COLOR).all()
    draw(F.POINT, {"points": [{"x": 1.0, "y": 0.0}, {"x": -1, "y": 2}]}, w=64, h=48)
    draw(F.CAPTION, {"caption": "tiny frame " * 5}, w=32, h=24)
    draw(F.CAPTION, {"caption": ""})
    draw(F.DETECT, {"objects": []})


def test_the_font_ships_with_pillow_and_text_is_cached() -> None:
    assert isinstance(font(16), ImageFont.FreeTypeFont)
    before = text_bitmap.cache_info()
    for _ in range(3):
        build_plan(F.CAPTION, {"caption": "cached words"}, W, H, 0.8, 1.0)
    after = text_bitmap.cache_info()
    assert after.hits - before.hits >= 2
