"""Drawing primitives over PIL: a plot area with axes, ticks and text.

Only PIL and numpy: no plotting dependency. Everything is drawn from data with integer
pixel coordinates and PIL's built-in font, so the same data gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (225, 225, 225)
SHADE = (244, 246, 250)
MUTED = (130, 130, 130)

_FONTS: dict[int, ImageFont.ImageFont | ImageFont.FreeTypeFont] = {}


def font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font (bundled with Pillow: no system font lookup, same on every machine)."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def text_width(draw: ImageDraw.ImageDraw, text: str, size: int = 11) -> int:
    box = draw.textbbox((0, 0), text, font=font(size))
    return int(box[2] - box[0])


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, size: int = 11) -> str:
    """``text`` cut from the left (keeping the informative end of a key) to fit ``width``."""
    if text_width(draw, text, size) <= width:
        return text
    while len(text) > 1 and text_width(draw, "..." + text, size) > width:
        text = text[1:]
    return "..." + text


@dataclass(frozen=True)
class Box:
    """A plot area in pixels."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass(frozen=True)
class Axis:
    """A y axis: linear or log10 between ``lo`` and ``hi``."""

    lo: float
    hi: float
    log: bool = False

    def frac(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            a, b, x = math.log10(self.lo), math.log10(self.hi), math.log10(v)
        else:
            a, b, x = self.lo, self.hi, v
        if b <= a:
            return 0.0
        return min(1.0, max(0.0, (x - a) / (b - a)))

    def y(self, box: Box, v: float) -> int:
        return int(round(box.bottom - self.frac(v) * box.height))


def x_span(box: Box, i: int, n: int) -> tuple[int, int]:
    """Pixel columns of item ``i`` of ``n`` spread over the box (at least one pixel wide)."""
    x0 = box.left + (i * box.width) // n
    x1 = box.left + ((i + 1) * box.width) // n - 1
    if n <= box.width // 3 and x1 - x0 >= 2:
        x1 -= 1  # a gap between bars while they are wide enough to have one
    return x0, max(x0, x1)


def frame(draw: ImageDraw.ImageDraw, box: Box, axis: Axis, ticks: list[tuple[float, str]],
          title: str) -> None:
    """Grid lines at ``ticks``, labels on the left, a title above, the frame."""
    for v, label in ticks:
        y = axis.y(box, v)
        draw.line([(box.left, y), (box.right, y)], fill=GRID)
        w = text_width(draw, label, 10)
        draw.text((box.left - 4 - w, y - 6), label, fill=MUTED, font=font(10))
    draw.text((box.left, box.top - 15), title, fill=INK, font=font(12))
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=MUTED)


def new_image(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (width, height), BACKGROUND)
    return img, ImageDraw.Draw(img)


def to_array(img: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float32 in 0..1 (ComfyUI's IMAGE layout without the batch axis)."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
