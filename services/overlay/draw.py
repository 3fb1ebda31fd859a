"""Drawing Moondream results on frames, the way Scope's plugin draws them, fast.

What is drawn follows the reference plugin (``scope-moondream/overlay.py``):

* **caption / query**: a black bar across the bottom (alpha ``180/255 × opacity``, at most a
  third of the frame high) with white text wrapped to the frame width (10 px margins, 8 px
  padding, line height = height of "Ag" + 4); a query shows ``Q: …`` then ``A: …``;
* **detect**: per object a green ``(0, 220, 0)`` box, filled at ``40/255 × opacity``, outlined
  ``max(2, 2 × font_scale)`` px wide, and a ``#n`` label in green on black above its top-left
  corner (below the box when there is no room above);
* **point**: per point a red ``(220, 50, 50)`` dot of radius ``max(4, 6 × font_scale)`` with a
  white outline, and a red ``#n`` label to its right.

Text is Pillow's built-in FreeType font (``ImageFont.load_default(size=16 × font_scale)``), so
no system font is needed. ``overlay_opacity`` scales every element (the reference applies it to
fills only; at 0 an overlay should vanish).

Speed: a result is laid out once into an :class:`OverlayPlan` (text wrapped and rendered, every
element clipped to the frame, alpha pre-multiplied); drawing a frame is then only integer
alpha blends over the affected regions (``(dst × (256 - a) + colour × a) >> 8`` in uint16).
Rendered text bitmaps are cached per ``(text, size)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from services.overlay.config import MoondreamFeature

BASE_FONT_PX = 16
BOX_COLOR = (0, 220, 0)
POINT_COLOR = (220, 50, 50)
POINT_OUTLINE = (255, 255, 255)
TEXT_COLOR = (255, 255, 255)
LABEL_BG = (0, 0, 0)
BAR_COLOR = (0, 0, 0)
BOX_FILL_ALPHA = 40 / 255
BAR_ALPHA = 180 / 255
TEXT_MARGIN_PX = 10
BAR_PADDING_PX = 8


@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded font (FreeType) at ``size`` px; no system font involved."""
    return ImageFont.load_default(size=size)


def font_size(font_scale: float) -> int:
    return max(1, int(BASE_FONT_PX * font_scale))


@dataclass(frozen=True, slots=True)
class TextBitmap:
    """Coverage (0–255) of rendered text; ``left``/``top``: offset from the draw origin."""

    mask: np.ndarray
    left: int
    top: int


@functools.lru_cache(maxsize=1024)
def text_bitmap(text: str, size: int) -> TextBitmap:
    """``text`` rendered once per ``(text, size)``; placed like ``ImageDraw.text((x, y))``."""
    left, top, right, bottom = (int(v) for v in font(size).getbbox(text))
    if right <= left or bottom <= top:
        return TextBitmap(np.zeros((0, 0), np.uint8), 0, 0)
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), text, font=font(size), fill=255)
    return TextBitmap(np.asarray(image), left, top)


@functools.lru_cache(maxsize=32)
def dot_sprite(radius: int, outline: int) -> tuple[np.ndarray, np.ndarray]:
    """A red dot with a white outline: (rgb H×W×3, alpha H×W), H = W = 2 × radius + 1."""
    side = 2 * radius + 1
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse(
        [0, 0, side - 1, side - 1], fill=POINT_COLOR, outline=POINT_OUTLINE, width=outline
    )
    rgba = np.asarray(image)
    return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])


@functools.lru_cache(maxsize=4096)
def advance(text: str, size: int) -> float:
    """Horizontal advance of ``text`` in px (cached: wrapping measures words, not lines)."""
    return float(font(size).getlength(text))


def wrap_text(text: str, size: int, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` px; a word wider than a line is split."""
    space = advance(" ", size)
    lines: list[str] = []
    current: list[str] = []
    current_width = 0.0
    for word in text.split():
        for piece in _split_long_word(word, size, max_width):
            width = advance(piece, size)
            if current and current_width + space + width <= max_width:
                current.append(piece)
                current_width += space + width
            else:
                if current:
                    lines.append(" ".join(current))
                current, current_width = [piece], width
    if current:
        lines.append(" ".join(current))
    return lines


def _split_long_word(word: str, size: int, max_width: int) -> list[str]:
    if advance(word, size) <= max_width:
        return [word]
    pieces: list[str] = []
    piece = ""
    for char in word:
        if piece and font(size).getlength(piece + char) > max_width:
            pieces.append(piece)
            piece = ""
        piece += char
    if piece:
        pieces.append(piece)
    return pieces


class _Blend:
    """One alpha blend of a colour (or an RGB sprite) over a clipped region of the frame.

    Colours and weights are stored per row (``w*3`` values, or ``h × w*3``) rather than per
    pixel as ``(3,)`` or ``(…, 1)``: numpy then runs its inner loop over whole rows instead of
    3-element pixels, about 7× faster on a large box.
    """

    __slots__ = ("ca", "inv", "opaque", "x0", "x1", "y0", "y1")

    def __init__(
        self, y0: int, y1: int, x0: int, x1: int, inv: Any, ca: np.ndarray, opaque: bool
    ) -> None:
        self.y0, self.y1, self.x0, self.x1 = y0, y1, x0, x1
        self.inv = inv  # 256 - alpha: int, or uint16 h × w*3
        self.ca = ca  # colour × alpha: uint16 w*3 (a row) or h × w*3
        self.opaque = opaque  # alpha 256 everywhere: ``ca >> 8`` is the colour

    @property
    def size(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0) * 3

    def apply(self, frame: np.ndarray, scratch: np.ndarray) -> None:
        # A view (rows of a frame slice are contiguous), so writes land in the frame.
        rows = frame[self.y0 : self.y1, self.x0 : self.x1].reshape(self.y1 - self.y0, -1)
        if self.opaque:
            rows[...] = self.ca >> 8
            return
        tmp = scratch[: rows.size].reshape(rows.shape)
        np.multiply(rows, self.inv, out=tmp, dtype=np.uint16)
        tmp += self.ca
        tmp >>= 8
        np.copyto(rows, tmp, casting="unsafe")


class OverlayPlan:
    """A result laid out for one frame size; :meth:`draw` blends it onto a frame in place."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._blends: list[_Blend] = []
        self._scratch = np.empty(0, np.uint16)

    def __len__(self) -> int:
        return len(self._blends)

    def draw(self, frame: np.ndarray) -> None:
        if frame.shape[:2] != (self.height, self.width):
            got = f"{frame.shape[1]}x{frame.shape[0]}"
            raise ValueError(f"plan is for {self.width}x{self.height}, frame is {got}")
        for blend in self._blends:
            blend.apply(frame, self._scratch)

    # ------------------------------------------------------------ building

    def _clip(self, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int] | None:
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, self.width), min(y1, self.height)
        if cx0 >= cx1 or cy0 >= cy1:
            return None
        return cx0, cy0, cx1, cy1

    def _add(self, blend: _Blend) -> None:
        self._blends.append(blend)
        if blend.size > self._scratch.size:
            self._scratch = np.empty(blend.size, np.uint16)

    def fill(
        self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], alpha: float
    ) -> None:
        """Blend ``color`` over the rectangle [x0, x1) × [y0, y1)."""
        a = round(alpha * 256)
        clipped = self._clip(x0, y0, x1, y1)
        if clipped is None or a <= 0:
            return
        cx0, cy0, cx1, cy1 = clipped
        ca = np.tile(np.array(color, np.uint16) * np.uint16(a), cx1 - cx0)
        self._add(_Blend(cy0, cy1, cx0, cx1, 256 - a, ca, opaque=a >= 256))

    def sprite(self, x: int, y: int, coverage: np.ndarray, color: Any, alpha: float) -> None:
        """Blend ``color`` (RGB triple or H×W×3) at (x, y) weighted by ``coverage`` (0–255)."""
        h, w = coverage.shape
        a_scale = round(alpha * 256)
        clipped = self._clip(x, y, x + w, y + h)
        if clipped is None or a_scale <= 0:
            return
        cx0, cy0, cx1, cy1 = clipped
        sub = (slice(cy0 - y, cy1 - y), slice(cx0 - x, cx1 - x))
        a = (coverage[sub].astype(np.uint32) * a_scale + 127) // 255
        a16 = a.astype(np.uint16)[..., None]
        rgb = np.asarray(color, np.uint16)
        if rgb.ndim == 3:
            rgb = rgb[sub]
        h, w = cy1 - cy0, cx1 - cx0
        ca = (rgb * a16).astype(np.uint16).reshape(h, w * 3)
        inv = np.repeat((256 - a16).astype(np.uint16), 3, axis=2).reshape(h, w * 3)
        self._add(_Blend(cy0, cy1, cx0, cx1, inv, ca, opaque=False))

    def text(
        self, x: int, y: int, text: str, size: int, color: tuple[int, int, int], alpha: float
    ) -> None:
        bitmap = text_bitmap(text, size)
        if bitmap.mask.size:
            self.sprite(x + bitmap.left, y + bitmap.top, bitmap.mask, color, alpha)


def plan_text_bar(
    plan: OverlayPlan, paragraphs: list[str], opacity: float, font_scale: float
) -> None:
    """The caption / Q&A bar at the bottom of the frame."""
    size = font_size(font_scale)
    lines = [
        line
        for paragraph in paragraphs
        for line in wrap_text(paragraph, size, plan.width - 2 * TEXT_MARGIN_PX)
    ]
    if not lines:
        return
    line_height = int(font(size).getbbox("Ag")[3]) + 4
    bar_height = min(len(lines) * line_height + 2 * BAR_PADDING_PX, plan.height // 3)
    bar_y = plan.height - bar_height
    plan.fill(0, bar_y, plan.width, plan.height, BAR_COLOR, BAR_ALPHA * opacity)
    text_y = bar_y + BAR_PADDING_PX
    for line in lines:
        if text_y + line_height > bar_y + bar_height:
            break
        plan.text(TEXT_MARGIN_PX, text_y, line, size, TEXT_COLOR, opacity)
        text_y += line_height


def plan_boxes(
    plan: OverlayPlan, objects: list[dict[str, float]], opacity: float, font_scale: float
) -> None:
    """Green numbered boxes; coordinates normalised to [0, 1]."""
    w, h = plan.width, plan.height
    size = font_size(font_scale)
    line = max(2, int(2 * font_scale))
    for i, obj in enumerate(objects):
        x1, x2 = sorted((int(obj["x_min"] * w), int(obj["x_max"] * w)))
        y1, y2 = sorted((int(obj["y_min"] * h), int(obj["y_max"] * h)))
        # Pixels x1..x2, y1..y2 inclusive (as PIL's rectangle); the outline is drawn inwards.
        plan.fill(x1 + line, y1 + line, x2 - line + 1, y2 - line + 1, BOX_COLOR,
                  BOX_FILL_ALPHA * opacity)  # fmt: skip
        plan.fill(x1, y1, x2 + 1, y1 + line, BOX_COLOR, opacity)
        plan.fill(x1, y2 - line + 1, x2 + 1, y2 + 1, BOX_COLOR, opacity)
        plan.fill(x1, y1 + line, x1 + line, y2 - line + 1, BOX_COLOR, opacity)
        plan.fill(x2 - line + 1, y1 + line, x2 + 1, y2 - line + 1, BOX_COLOR, opacity)
        label = f"#{i + 1}"
        left, top, right, bottom = (int(v) for v in font(size).getbbox(label))
        text_w, text_h = right - left, bottom - top
        bg = (x1, y1 - text_h - 4, x1 + text_w + 6, y1)
        if bg[1] < 0:
            bg = (x1, y2, x1 + text_w + 6, y2 + text_h + 4)
        plan.fill(bg[0], bg[1], bg[2] + 1, bg[3] + 1, LABEL_BG, opacity)
        plan.text(bg[0] + 3, bg[1] + 2, label, size, BOX_COLOR, opacity)


def plan_points(
    plan: OverlayPlan, points: list[dict[str, float]], opacity: float, font_scale: float
) -> None:
    """Red numbered dots; coordinates normalised to [0, 1]."""
    size = font_size(font_scale)
    radius = max(4, int(6 * font_scale))
    rgb, coverage = dot_sprite(radius, max(1, int(font_scale)))
    for i, pt in enumerate(points):
        cx, cy = int(pt["x"] * plan.width), int(pt["y"] * plan.height)
        plan.sprite(cx - radius, cy - radius, coverage, rgb, opacity)
        plan.text(cx + radius + 3, cy - radius, f"#{i + 1}", size, POINT_COLOR, opacity)


def build_plan(
    feature: MoondreamFeature,
    result: dict[str, Any],
    width: int,
    height: int,
    opacity: float,
    font_scale: float,
) -> OverlayPlan:
    """Lay out one result (as :func:`services.overlay.model.run_feature` returns it)."""
    plan = OverlayPlan(width, height)
    match feature:
        case MoondreamFeature.CAPTION:
            plan_text_bar(plan, [result.get("caption", "")], opacity, font_scale)
        case MoondreamFeature.QUERY:
            paragraphs = [f"Q: {result.get('question', '')}", f"A: {result.get('answer', '')}"]
            plan_text_bar(plan, paragraphs, opacity, font_scale)
        case MoondreamFeature.DETECT:
            plan_boxes(plan, result.get("objects", []), opacity, font_scale)
        case MoondreamFeature.POINT:
            plan_points(plan, result.get("points", []), opacity, font_scale)
    return plan
