"""Frame numbers drawn into video frames as black/white blocks, readable after lossy coding.

Layout: the top third of the frame is a band of ``PATTERN_ROWS x PATTERN_COLS`` cells
spanning the full width, each cell pure black (bit 0) or pure white (bit 1)::

    +------+------+-- ... --+------+
    | d15  | d14  |         |  d8  |   row 0: data bits 15..8
    | d7   | d6   |         |  d0  |   row 1: data bits 7..0
    | ~d15 | ~d14 |         | ~d8  |   row 2: complement of row 0
    | ~d7  | ~d6  |         | ~d0  |   row 3: complement of row 1
    +------+------+-- ... --+------+
    |                              |
    |  rest of the frame untouched |

Every bit is stored twice, once inverted, so a misread cell, a frame without the pattern
(all black, all grey, camera content) or a half-decoded frame yields ``None`` instead of a
wrong number. Cell boundaries are fractions of the frame size, so the pattern is still read
after the whole frame has been scaled to another resolution or aspect ratio. The reader
averages the inner half of each cell, which keeps it clear of blurred edges and ringing.

The number is stored modulo 2**16.
"""

from __future__ import annotations

import numpy as np

PATTERN_ROWS = 4
PATTERN_COLS = 8
PATTERN_BITS = 16
PATTERN_MODULUS = 1 << PATTERN_BITS

_BLACK_MAX = 80  # mean luma at or below this reads as 0
_WHITE_MIN = 175  # mean luma at or above this reads as 1
_SAMPLES_PER_AXIS = 8  # sample points per cell per axis when reading
_MIN_WIDTH_PX = 2 * PATTERN_COLS
_MIN_HEIGHT_PX = 6 * PATTERN_ROWS

# Bit weights for the 2x8 data cells, most significant first.
_WEIGHTS = (1 << np.arange(PATTERN_BITS - 1, -1, -1, dtype=np.int64)).reshape(2, PATTERN_COLS)


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] < _MIN_HEIGHT_PX or rgb.shape[1] < _MIN_WIDTH_PX:
        raise ValueError(f"frame {rgb.shape[1]}x{rgb.shape[0]} is too small for the pattern")


def _band_height(height: int) -> int:
    return height // 3


def _bits(n: int) -> np.ndarray:
    """The 4x8 cell grid for ``n``: data rows then their complement."""
    data = ((n & (PATTERN_MODULUS - 1)) & _WEIGHTS) != 0
    return np.concatenate([data, ~data])


def draw_frame_number(rgb: np.ndarray, n: int) -> None:
    """Draw ``n`` (modulo 2**16) into the top third of ``rgb`` in place.

    ``rgb`` is an (H, W, 3) uint8 array at least 16 pixels wide and 24 high; any strides.
    """
    _check_rgb(rgb)
    if n < 0:
        raise ValueError(f"frame number must be >= 0, got {n}")
    height, width = rgb.shape[:2]
    band_h = _band_height(height)
    # Cell index of every pixel row and column of the band.
    cell_row = (np.arange(band_h) * PATTERN_ROWS) // band_h
    cell_col = (np.arange(width) * PATTERN_COLS) // width
    white = _bits(n)[cell_row[:, None], cell_col[None, :]]
    rgb[:band_h] = (white.astype(np.uint8) * 255)[:, :, None]


def _sample_positions(length: int, cells: int) -> np.ndarray:
    """Pixel positions inside the inner half of each of ``cells`` equal cells over ``length``."""
    cell = length / cells
    starts = np.arange(cells) * cell + cell / 4
    offsets = np.linspace(0.0, cell / 2, _SAMPLES_PER_AXIS)
    positions = (starts[:, None] + offsets[None, :]).ravel()
    return np.clip(positions.astype(np.intp), 0, length - 1)


def read_frame_number(rgb: np.ndarray) -> int | None:
    """Read the number drawn by :func:`draw_frame_number`, or ``None`` if it is not there.

    Works on frames that went through lossy coding and whole-frame scaling. Returns ``None``
    when any cell is neither clearly black nor clearly white, or when a data bit and its
    complement disagree.
    """
    _check_rgb(rgb)
    height, width = rgb.shape[:2]
    rows = _sample_positions(_band_height(height), PATTERN_ROWS)
    cols = _sample_positions(width, PATTERN_COLS)
    samples = rgb[rows[:, None], cols[None, :]]  # (rows*k, cols*k, 3)
    k = _SAMPLES_PER_AXIS
    luma = samples.reshape(PATTERN_ROWS, k, PATTERN_COLS, k, 3).mean(axis=(1, 3, 4))
    white = luma >= _WHITE_MIN
    black = luma <= _BLACK_MAX
    if not np.all(white | black):
        return None
    data, check = white[:2], white[2:]
    if np.any(data == check):
        return None
    return int(_WEIGHTS[data].sum())
