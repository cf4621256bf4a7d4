"""What a chart shows, independent of where it came from (extraction or validation).

Layers stay in model order (the order of the model file / state dict) and are grouped into
blocks by their path, so a chart reads like the network: input blocks, middle, output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..extract.keys.lora_keys import diffusion_path
from ..extract.report import STATUS_DIFF, STATUS_LORA, ExtractionReport
from ..memory.blocks import block_label
from ..validation.report import (
    STATUS_COVERED,
    STATUS_NOT_MERGED,
    STATUS_SPURIOUS,
    STATUS_UNCOVERED,
    ValidationReport,
)

# Short names for the usual containers, so block labels fit under narrow spans.
_SHORT = {"input_blocks": "in", "output_blocks": "out", "middle_block": "mid",
          "double_blocks": "double", "single_blocks": "single", "transformer_blocks": "tb",
          "joint_blocks": "joint", "down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


def short_block(block: str) -> str:
    head, _, tail = block.partition(".")
    head = _SHORT.get(head, head)
    return f"{head}{tail}" if tail else head


@dataclass(frozen=True)
class ChartLayer:
    """One bar of the per-layer chart."""

    key: str
    block: str
    rank: int | None          # None: stored as a plain difference (or not at all)
    error: float | None       # relative error; None: not measured
    status: str               # lora / diff / uncovered / not_merged / ...
    # Quantized inputs: the rounding-noise floor relative to the difference (comparable with
    # ``error``), and whether the difference is at the noise level; None/False otherwise.
    noise_floor: float | None = None
    at_noise_level: bool = False


@dataclass(frozen=True)
class SpectrumSeries:
    """Leading singular values of one layer and the rank kept from them."""

    key: str
    sigma: list[float] = field(default_factory=list)
    cut: int | None = None


def rows_from_extraction(report: ExtractionReport) -> list[ChartLayer]:
    """Stored layers (LoRA and diff) in model order."""
    return [ChartLayer(r.key, block_label(r.key), r.rank, r.rel_error, r.status,
                       r.noise_floor, r.at_noise_level)
            for r in report.layers if r.status in (STATUS_LORA, STATUS_DIFF)]


def rows_from_validation(report: ValidationReport) -> list[ChartLayer]:
    """Weights the fine-tune changed, plus weights the LoRA changes wrongly, in model order."""
    return [ChartLayer(r.key, block_label(r.key), r.rank, r.rel_error, r.status)
            for r in report.layers
            if r.status in (STATUS_COVERED, STATUS_UNCOVERED, STATUS_NOT_MERGED, STATUS_SPURIOUS)]


def largest_spectra(entries: list[tuple[str, list[int], list[float], int | None]],
                    n: int = 4) -> list[SpectrumSeries]:
    """The ``n`` largest layers (by element count) that have a spectrum, largest first."""
    with_sigma = [e for e in entries if e[2]]

    def numel(shape: list[int]) -> int:
        out = 1
        for s in shape:
            out *= s
        return out

    with_sigma.sort(key=lambda e: (-numel(e[1]), e[0]))
    return [SpectrumSeries(diffusion_path(key) or key, list(sigma), cut)
            for key, _shape, sigma, cut in with_sigma[:n]]


def spectra_from_extraction(report: ExtractionReport, n: int = 4) -> list[SpectrumSeries]:
    return largest_spectra([(r.key, r.shape, r.spectrum, r.rank) for r in report.layers
                            if r.status == STATUS_LORA], n)


def spectra_from_validation(report: ValidationReport, n: int = 4) -> list[SpectrumSeries]:
    return largest_spectra([(r.key, r.shape, r.spectrum, r.rank) for r in report.layers], n)
