"""The error-against-size curve of any extraction, from the spectra its report recorded."""

from __future__ import annotations

import math

import torch

from ..config import ExtractConfig
from ..report import STATUS_DIFF, STATUS_LORA, ExtractionReport
from .rank_math import LayerSpectrum, point_for_ranks, rank_unit_bytes, size_curve
from .size_types import SizeCurve


def stored_diff_bytes(shape: list[int] | tuple[int, ...], itemsize: int) -> int:
    """Bytes of a difference stored as is (``.diff`` / ``.diff_b``) at the output dtype."""
    return math.prod(int(d) for d in shape) * itemsize


def curve_from_report(report: ExtractionReport, cfg: ExtractConfig) -> SizeCurve | None:
    """The size curve over the LoRA layers' recorded spectra (None without any).

    Exact runs record every singular value (the first 256 are kept); randomized runs the top
    ``cap`` (plus oversampling for the adaptive rules) with the exact total energy: within the
    caps the curve is computed from those, nothing estimated past them.
    """
    itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
    layers: list[LayerSpectrum] = []
    ranks: list[int] = []
    fixed = 0
    short = 0
    for r in report.layers:
        if r.status == STATUS_DIFF:
            fixed += stored_diff_bytes(r.shape, itemsize)
        elif r.status == STATUS_LORA and r.spectrum and r.energy:
            cap = min(cfg.rank_cap(len(r.shape)), r.shape[0], math.prod(r.shape[1:]))
            short += len(r.spectrum) < cap
            layers.append(LayerSpectrum(r.key, torch.tensor(r.spectrum, dtype=torch.float64),
                                        float(r.energy), rank_unit_bytes(r.shape, itemsize), cap))
            ranks.append(r.rank or 1)
    if not layers:
        return None
    curve = size_curve(layers, fixed)
    curve.chosen = point_for_ranks(layers, ranks, fixed)
    if short:
        curve.partial_note = (f"{short} layer(s) recorded fewer singular values than their cap; "
                              "the curve stops at what was recorded for them")
    return curve
