"""Error against file size (from the spectra), with this run's file marked."""

from __future__ import annotations

from PIL import ImageDraw

from ..extract.budget.size_types import MIB, SizeCurve
from .canvas import GRID, INK, MUTED, Axis, Box, fit_text, font

LINE = (70, 110, 190)
CHOSEN = (225, 110, 0)      # not the spectra's red cut line


def draw_size_curve(draw: ImageDraw.ImageDraw, box: Box, curve: SizeCurve) -> None:
    """Mean relative error (y, linear from 0) against tensor MiB (x), the chosen point in red."""
    draw.text((box.left, box.top - 15), fit_text(draw, "error vs file size (from the spectra)",
                                                  box.width, 11), fill=INK, font=font(11))
    pts = [(p.tensor_bytes / MIB, p.mean_rel_error) for p in curve.points]
    chosen = curve.chosen
    if chosen is not None:
        pts_all = pts + [(chosen.tensor_bytes / MIB, chosen.mean_rel_error)]
    else:
        pts_all = pts
    if not pts:
        draw.rectangle([box.left, box.top, box.right, box.bottom], outline=MUTED)
        return
    x_lo, x_hi = min(p[0] for p in pts_all), max(p[0] for p in pts_all)
    y_hi = max(p[1] for p in pts_all) * 1.1 or 1.0
    axis = Axis(0.0, y_hi)

    def x(v: float) -> int:
        span = x_hi - x_lo
        return int(round(box.left + (0.5 if span <= 0 else (v - x_lo) / span) * box.width))

    for frac in (0.25, 0.5, 0.75):
        y = axis.y(box, frac * y_hi)
        draw.line([(box.left, y), (box.right, y)], fill=GRID)
        draw.text((box.left + 2, y - 11), f"{frac * y_hi:.2f}", fill=MUTED, font=font(9))
    line = [(x(a), axis.y(box, b)) for a, b in pts]
    if len(line) == 1:
        line.append(line[0])
    draw.line(line, fill=LINE, width=2)
    for px, py in line:
        draw.rectangle([px - 1, py - 1, px + 1, py + 1], fill=LINE)
    if chosen is not None:
        cx, cy = x(chosen.tensor_bytes / MIB), axis.y(box, chosen.mean_rel_error)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], outline=CHOSEN, width=2)
        label = f"this file: {chosen.tensor_bytes / MIB:.2f} MiB, {chosen.mean_rel_error:.3f}"
        draw.text((max(box.left + 2, min(cx - 40, box.right - 150)), max(box.top + 2, cy - 16)),
                  label, fill=CHOSEN, font=font(9))
    draw.text((box.left + 2, box.bottom - 13), f"{x_lo:.2f} MiB", fill=MUTED, font=font(9))
    draw.text((box.right - 60, box.bottom - 13), f"{x_hi:.2f} MiB", fill=MUTED, font=font(9))
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=MUTED)
