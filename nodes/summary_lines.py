"""The few lines a node's summary box shows first, above the full report.

The box on the node shows these key lines without scrolling (web/report_summary.js sizes it to
the block before the first blank line): the file, its size, the ranks, the mean, median and worst
error, the quantization noise floor when an input is quantized, and the skipped and flagged
counts. The full report follows after a blank line.
"""

from __future__ import annotations

import os

from ..extract.report import STATUS_SKIPPED, ExtractionReport
from ..validation.report import ValidationReport


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "ranks: none (diffs only)"
    lo, hi = min(ranks), max(ranks)
    return f"ranks: {lo}" if lo == hi else f"ranks: {lo}..{hi} (mean {sum(ranks) / len(ranks):.1f})"


def with_key_lines(key_lines: list[str], full_text: str) -> str:
    """Key lines, a blank line, then the full report (the box's layout relies on the blank)."""
    return "\n".join(key_lines) + "\n\n" + full_text


def extraction_key_lines(report: ExtractionReport, path: str) -> list[str]:
    """File and size, ranks, error statistics, skipped and flagged counts of an extraction.

    Flagged: layers stored with a note (e.g. a diff ComfyUI's own loader does not apply).
    """
    s = report.summary()
    flagged = sum(1 for r in report.layers if r.status != STATUS_SKIPPED and r.reason)
    lines = [
        f"saved: {os.path.basename(path)}",
        f"size: {s.file_bytes / 2**20:.2f} MiB, {s.lora} LoRA + {s.diff} diff layers",
        _ranks([r.rank for r in report.layers if r.rank]),
        f"error: mean {_pct(s.mean_error)}, median {_pct(s.median_error)}, worst {_pct(s.worst_error)}",
    ]
    if s.median_noise_floor is not None:
        # Quantized inputs: the share of the difference that is rounding noise, beside the error.
        left_out = sum(1 for r in report.layers if r.at_noise_level and r.status == STATUS_SKIPPED)
        lines.append(f"quantization noise floor: median {_pct(s.median_noise_floor)}; "
                     f"{s.noise_layers} layers at the noise level"
                     + (f" ({left_out} left out)" if left_out else ""))
    lines.append(f"skipped: {s.skipped}, flagged: {flagged}" + (" (see notes)" if flagged else ""))
    return lines


def validation_key_lines(report: ValidationReport, path: str) -> list[str]:
    """File and size, coverage and ranks, error statistics, skipped and flagged counts.

    Skipped: changed weights the loader leaves as in the base (uncovered or not merged).
    Flagged: LoRA keys that match nothing, and unchanged weights the LoRA changes.
    """
    s = report.summary()
    size = os.path.getsize(path) / 2**20 if os.path.isfile(path) else 0.0
    ranks = [r.rank for r in report.layers if r.rank]
    return [
        f"file: {os.path.basename(path)}",
        f"size: {size:.2f} MiB, coverage {s.covered}/{s.changed} changed weights",
        _ranks(ranks),
        f"error: mean {_pct(s.mean_error)}, median {_pct(s.median_error)}, worst {_pct(s.worst_error)}"
        f", whole model {_pct(s.overall_error)}",
        f"skipped: {s.uncovered + s.not_merged}, flagged: {s.unmatched_keys + s.spurious}",
    ]
