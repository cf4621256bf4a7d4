"""Singular-value spectra of the largest layers, with the kept rank marked."""

from __future__ import annotations

import math

from PIL import ImageDraw

from .canvas import GRID, INK, MUTED, Axis, Box, fit_text, font
from .rows import SpectrumSeries

LINE = (70, 110, 190)
KEPT = (222, 232, 250)
CUT = (210, 50, 50)


def draw_spectrum(draw: ImageDraw.ImageDraw, box: Box, series: SpectrumSeries) -> None:
    """log10(sigma_i) against i, the kept part shaded, the cut as a red line."""
    sigma = [s for s in series.sigma if s > 0 and math.isfinite(s)]
    # Show the head, where the cut is decided: 4x the kept rank (at least 32 values), not the
    # whole recorded tail, which would squeeze the interesting part into a few pixels.
    sigma = sigma[: max(32, 4 * (series.cut or 8))]
    draw.text((box.left, box.top - 15), fit_text(draw, series.key, box.width, 11), fill=INK, font=font(11))
    if not sigma:
        draw.rectangle([box.left, box.top, box.right, box.bottom], outline=MUTED)
        draw.text((box.left + 6, box.top + 6), "no spectrum", fill=MUTED, font=font(10))
        return
    hi, lo = sigma[0], max(sigma[-1], sigma[0] * 1e-6)
    axis = Axis(lo / 1.5, hi * 1.5, log=True)
    n = len(sigma)

    def x(i: float) -> int:
        return int(round(box.left + i * box.width / max(1, n - 1)))

    if series.cut is not None and series.cut > 0:
        draw.rectangle([box.left, box.top, x(min(series.cut, n) - 1), box.bottom], fill=KEPT)
    for e in range(math.floor(math.log10(axis.lo)) + 1, math.floor(math.log10(axis.hi)) + 1):
        y = axis.y(box, 10.0 ** e)
        draw.line([(box.left, y), (box.right, y)], fill=GRID)
        draw.text((box.left + 2, y - 11), f"1e{e}", fill=MUTED, font=font(9))
    points = [(x(i), axis.y(box, s)) for i, s in enumerate(sigma)]
    if len(points) == 1:
        points.append(points[0])
    draw.line(points, fill=LINE, width=2)
    if series.cut is not None and series.cut > 0:
        xc = x(min(series.cut, n) - 1)
        draw.line([(xc, box.top), (xc, box.bottom)], fill=CUT, width=2)
        label = f"rank {series.cut}"
        draw.text((min(xc + 3, box.right - 50), box.top + 3), label, fill=CUT, font=font(10))
    draw.text((box.right - 70, box.bottom - 13), f"first {n} values", fill=MUTED, font=font(9))
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=MUTED)
