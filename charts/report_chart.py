"""The whole report picture: title, rank and error panels by block, spectra of the largest layers."""

from __future__ import annotations

from PIL import Image

from ..extract.budget.size_types import SizeCurve
from .canvas import INK, MUTED, Box, fit_text, font, new_image
from .layer_chart import draw_block_labels, draw_error_panel, draw_rank_panel
from .rows import ChartLayer, SpectrumSeries
from .size_curve_chart import draw_size_curve
from .spectrum_chart import draw_spectrum

WIDTH = 1200
HEIGHT = 760
MARGIN_LEFT = 56
MARGIN_RIGHT = 16


def render_report_chart(rows: list[ChartLayer], spectra: list[SpectrumSeries], title: str,
                        subtitle: str = "", width: int = WIDTH, height: int = HEIGHT,
                        curve: SizeCurve | None = None) -> Image.Image:
    """A ``width`` x ``height`` RGB image; the same inputs always give the same pixels."""
    img, draw = new_image(width, height)
    draw.text((MARGIN_LEFT, 8), fit_text(draw, title, width - MARGIN_LEFT - MARGIN_RIGHT, 14),
              fill=INK, font=font(14))
    if subtitle:
        draw.text((MARGIN_LEFT, 27), fit_text(draw, subtitle, width - MARGIN_LEFT - MARGIN_RIGHT, 11),
                  fill=MUTED, font=font(11))
    right = width - MARGIN_RIGHT
    # Heights as shares of the image so a caller can ask for another size.
    h = height
    rank_box = Box(MARGIN_LEFT, int(h * 0.10), right, int(h * 0.30))
    err_box = Box(MARGIN_LEFT, int(h * 0.35), right, int(h * 0.60))
    if rows:
        draw_rank_panel(draw, rank_box, rows)
        draw_error_panel(draw, err_box, rows)
        draw_block_labels(draw, err_box, rows, err_box.bottom + 4)
    else:
        draw.text((MARGIN_LEFT, rank_box.top), "no stored or changed layers to show", fill=MUTED,
                  font=font(12))
    top = int(h * 0.70)
    bottom = height - 12
    draw.text((MARGIN_LEFT, top - 34), "singular values of the largest layers' differences "
              "(shaded: kept by the LoRA)", fill=INK, font=font(12))
    if curve is not None and curve.points:
        # The error-vs-size panel takes the right quarter of the bottom row.
        split = right - (right - MARGIN_LEFT) // 4
        draw_size_curve(draw, Box(split, top, right, bottom), curve)
        right = split - 24
    if spectra:
        n = len(spectra)
        gap = 24
        w = (right - MARGIN_LEFT - gap * (n - 1)) // n
        for i, s in enumerate(spectra):
            x0 = MARGIN_LEFT + i * (w + gap)
            draw_spectrum(draw, Box(x0, top, x0 + w, bottom), s)
    else:
        draw.text((MARGIN_LEFT, top), "no spectrum recorded", fill=MUTED, font=font(11))
    return img
