"""Text for size budgets and size curves: the report's lines and the dry run's table."""

from __future__ import annotations

from typing import Protocol

from .size_types import MIB, BudgetOutcome, SizeCurve


class _HasBudget(Protocol):
    budget: BudgetOutcome | None
    file_bytes: int
    tensor_bytes: int


def budget_lines(report: _HasBudget) -> list[str]:
    """Budget, bytes used and the implied threshold of a ``target_size_mb`` run."""
    b = report.budget
    if b is None:
        return []
    lines = [f"size budget: {b.budget_bytes / MIB:.3f} MiB ({b.budget_bytes} bytes of tensors); "
             f"used {b.used_bytes} bytes ({100 * b.used_bytes / max(1, b.budget_bytes):.2f}%), "
             f"smallest possible {b.required_bytes} bytes",
             *_cap_lines(b),
             f"predicted truncation error (before clamp/cast): mean "
             f"{b.predicted_mean_rel_error:.4f}, rms {b.predicted_rms_rel_error:.4f}, "
             f"worst layer {b.predicted_max_rel_error:.4f} over {b.lora_layers} LoRA layers"]
    if report.file_bytes:
        lines.append(f"file {report.file_bytes} bytes = tensors {report.tensor_bytes} + header "
                     f"{report.file_bytes - report.tensor_bytes} (the header is not budgeted)")
    return lines


def _cap_lines(b: BudgetOutcome) -> list[str]:
    """The implied threshold, or (every layer at its cap) that the caps set the size."""
    if not b.at_caps:
        return [_threshold_line(b)]
    return [f"every layer is at its rank cap: the caps, not the size budget, limited this file "
            f"to {b.used_bytes / MIB:.3f} of {b.budget_bytes / MIB:.3f} MiB. For a larger, more "
            "exact file raise the rank cap (command line: --rank, --conv-rank, "
            "--text-encoder-rank; nodes: rank, conv_rank, text_encoder_rank)."]


def _threshold_line(b: BudgetOutcome) -> str:
    if b.objective == "worst":
        if b.next_threshold == float("-inf"):
            return "objective worst: every layer at its rank cap (the budget holds them all)"
        level = max(b.next_threshold, 0.0) ** 0.5
        return (f"objective worst: no layer above relative error {level:.4f} except at its rank "
                f"cap (the worst layer's next rank did not fit); the bytes left went to the "
                f"next-worst layers")
    return (f"objective mean; implied threshold: a rank is kept when it removes >= "
            f"{b.threshold:.3e} of its layer's relative squared error per byte (next left out: "
            f"{b.next_threshold:.3e})")


def curve_lines(curve: SizeCurve | None, chosen_label: str = "<- this file") -> list[str]:
    """The error-against-size table (about 10 rows), the chosen point marked ``chosen_label``."""
    if curve is None or not curve.points:
        return []
    lines = ["error against size (truncated SVD; sizes without the header):",
             "      MiB   mean err    rms err   ranks"]
    for p in curve.points:
        lines.append(f"  {p.tensor_bytes / MIB:8.3f}   {p.mean_rel_error:8.4f}   "
                     f"{p.rms_rel_error:8.4f}   {p.rank_min}..{p.rank_max}")
    if curve.chosen is not None:
        c = curve.chosen
        lines.append(f"  {c.tensor_bytes / MIB:8.3f}   {c.mean_rel_error:8.4f}   "
                     f"{c.rms_rel_error:8.4f}   {c.rank_min}..{c.rank_max}   {chosen_label}")
    if curve.partial_note:
        lines.append(f"  ({curve.partial_note})")
    return lines
