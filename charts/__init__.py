"""Report charts rendered with numpy and PIL only (no plotting dependency, no ComfyUI).

``extraction_chart(report)`` and ``validation_chart(report)`` give a PIL image; ``to_array``
turns it into the float ``[H, W, 3]`` array that ComfyUI's IMAGE type wraps.
"""

from __future__ import annotations

from PIL import Image

from ..extract.report import ExtractionReport
from ..validation.report import ValidationReport
from .canvas import to_array
from .report_chart import HEIGHT, WIDTH, render_report_chart
from .rows import (
    ChartLayer,
    SpectrumSeries,
    rows_from_extraction,
    rows_from_validation,
    spectra_from_extraction,
    spectra_from_validation,
)


def extraction_chart(report: ExtractionReport, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    s = report.summary()
    cfg = report.config
    subtitle = (f"{s.lora} LoRA layers, {s.diff} diffs, {s.skipped} skipped; type "
                f"{cfg.get('lora_type')}, rank {cfg.get('rank')}")
    if report.budget is not None:
        subtitle += (f" (cap); size budget {report.budget.budget_bytes / 2**20:.2f} MiB, "
                     f"{report.budget.used_bytes / 2**20:.2f} MiB used")
    if s.mean_error is not None:
        subtitle += f"; mean error {100 * s.mean_error:.2f}%, worst {100 * (s.worst_error or 0):.2f}%"
    if s.median_noise_floor is not None:
        subtitle += (f"; quantization noise floor median {100 * s.median_noise_floor:.2f}%, "
                     f"{s.noise_layers} layers at the noise level")
    return render_report_chart(rows_from_extraction(report), spectra_from_extraction(report),
                               "LoRA extraction: rank and error per layer", subtitle, width, height,
                               curve=report.size_curve)


def validation_chart(report: ValidationReport, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    s = report.summary()
    subtitle = f"coverage {s.covered}/{s.changed}"
    if s.mean_error is not None:
        subtitle += f"; mean error {100 * s.mean_error:.2f}%, worst {100 * (s.worst_error or 0):.2f}%"
    if s.unmatched_keys:
        subtitle += f"; {s.unmatched_keys} LoRA keys match nothing"
    return render_report_chart(rows_from_validation(report), spectra_from_validation(report),
                               f"LoRA validation: {report.lora_name}", subtitle, width, height)


__all__ = ["HEIGHT", "WIDTH", "ChartLayer", "SpectrumSeries", "extraction_chart",
           "render_report_chart", "rows_from_extraction", "rows_from_validation", "to_array",
           "validation_chart"]
