"""Per-layer chart: chosen rank (top) and relative error (bottom), in model order, by block."""

from __future__ import annotations

import math

from PIL import ImageDraw

from .canvas import INK, MUTED, SHADE, Axis, Box, font, frame, text_width, x_span
from .rows import ChartLayer, short_block

RANK_COLOR = (70, 110, 190)
DIFF_COLOR = (170, 170, 170)
# Colors of the quality bands of the relative error (see validation/report.py).
BAND_COLORS = ((46, 160, 67), (150, 190, 40), (240, 150, 30), (210, 50, 50))
BAND_LIMITS = (0.05, 0.5, 1.0)
UNCOVERED_COLOR = (210, 50, 50)
# The quantization noise floor: a tick across each layer's bar at its floor, and a marker
# under layers whose difference is at the noise level (a LoRA of them is mostly noise).
NOISE_COLOR = (128, 40, 160)
ERROR_FLOOR = 1e-4  # log axis bottom: smaller errors are "perfect" at chart resolution


def band_color(err: float) -> tuple[int, int, int]:
    for limit, color in zip(BAND_LIMITS, BAND_COLORS, strict=False):
        if err < limit or (limit == 1.0 and err == 1.0):
            return color
    return BAND_COLORS[-1]


def block_spans(rows: list[ChartLayer]) -> list[tuple[str, int, int]]:
    """(block, first index, last index) for runs of consecutive rows in the same block."""
    spans: list[tuple[str, int, int]] = []
    for i, r in enumerate(rows):
        if spans and spans[-1][0] == r.block:
            spans[-1] = (r.block, spans[-1][1], i)
        else:
            spans.append((r.block, i, i))
    return spans


def _shade_blocks(draw: ImageDraw.ImageDraw, box: Box, spans: list[tuple[str, int, int]], n: int) -> None:
    for j, (_block, a, b) in enumerate(spans):
        if j % 2 == 1:
            x0, _ = x_span(box, a, n)
            _, x1 = x_span(box, b, n)
            draw.rectangle([x0, box.top + 1, x1, box.bottom - 1], fill=SHADE)


def _rank_ticks(hi: int) -> list[tuple[float, str]]:
    return [(0, "0"), (hi / 2, f"{hi / 2:g}"), (hi, str(hi))]


def draw_rank_panel(draw: ImageDraw.ImageDraw, box: Box, rows: list[ChartLayer]) -> None:
    n = max(1, len(rows))
    hi = max([r.rank for r in rows if r.rank is not None] or [1])
    axis = Axis(0.0, float(hi))
    _shade_blocks(draw, box, block_spans(rows), n)
    frame(draw, box, axis, _rank_ticks(hi), "rank per layer (grey: stored as a plain difference, "
          "red: not covered by the LoRA)")
    for i, r in enumerate(rows):
        x0, x1 = x_span(box, i, n)
        if r.rank is not None:
            draw.rectangle([x0, axis.y(box, r.rank), x1, box.bottom - 1], fill=RANK_COLOR)
        elif r.status in ("uncovered", "not_merged"):
            draw.rectangle([x0, box.bottom - 6, x1, box.bottom - 1], fill=UNCOVERED_COLOR)
        else:
            draw.rectangle([x0, box.bottom - 3, x1, box.bottom - 1], fill=DIFF_COLOR)


def draw_error_panel(draw: ImageDraw.ImageDraw, box: Box, rows: list[ChartLayer]) -> None:
    n = max(1, len(rows))
    errs = [r.error for r in rows if r.error is not None and math.isfinite(r.error)]
    hi = max(1.0, max(errs or [1.0]) * 1.2)
    axis = Axis(ERROR_FLOOR, hi, log=True)
    _shade_blocks(draw, box, block_spans(rows), n)
    ticks = [(1e-4, "0.01%"), (1e-3, "0.1%"), (1e-2, "1%"), (0.05, "5%"), (0.5, "50%"), (1.0, "100%")]
    if hi > 2:
        ticks.append((hi, f"{100 * hi:.0f}%"))
    floors = any(r.noise_floor is not None for r in rows)
    frame(draw, box, axis, ticks, "relative error per layer (log scale; bands: < 5% excellent, "
          "< 50% good, <= 100% poor, > 100% worse than nothing)"
          + ("; purple ticks: quantization noise floor, purple base: at the noise level"
             if floors else ""))
    for i, r in enumerate(rows):
        if r.error is None or not math.isfinite(r.error):
            continue
        x0, x1 = x_span(box, i, n)
        color = UNCOVERED_COLOR if r.status in ("uncovered", "not_merged") else band_color(r.error)
        y = axis.y(box, r.error)
        draw.rectangle([x0, min(y, box.bottom - 2), x1, box.bottom - 1], fill=color)
    for i, r in enumerate(rows):  # drawn over the bars: a floor below the error stays visible
        if r.noise_floor is None or not math.isfinite(r.noise_floor) or r.noise_floor <= 0:
            continue
        x0, x1 = x_span(box, i, n)
        y = max(box.top + 1, min(axis.y(box, max(r.noise_floor, ERROR_FLOOR)), box.bottom - 2))
        draw.rectangle([x0, y - 1, x1, y], fill=NOISE_COLOR)
        if r.at_noise_level:
            draw.rectangle([x0, box.bottom + 1, x1, box.bottom + 3], fill=NOISE_COLOR)


def draw_block_labels(draw: ImageDraw.ImageDraw, box: Box, rows: list[ChartLayer], y: int) -> None:
    """Block names under their spans, where they fit; ticks at block boundaries."""
    n = max(1, len(rows))
    for _block, a, _b in block_spans(rows)[1:]:
        x0, _ = x_span(box, a, n)
        draw.line([(x0, y - 4), (x0, y)], fill=MUTED)
    for block, a, b in block_spans(rows):
        x0, _ = x_span(box, a, n)
        _, x1 = x_span(box, b, n)
        label = short_block(block)
        w = text_width(draw, label, 10)
        if w + 2 <= x1 - x0 + 1:
            draw.text(((x0 + x1 - w) // 2, y), label, fill=INK, font=font(10))
