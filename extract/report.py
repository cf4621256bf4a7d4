"""Typed extraction report: one entry per model key, and a summary.

Every key of either model appears exactly once: extracted as a LoRA, stored as a diff, or
skipped with the reason. Serialises to JSON for the command line and the node's report output.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from .budget.size_text import budget_lines, curve_lines
from .budget.size_types import BudgetOutcome, SizeCurve
from .keys.te_keys import is_te_key

STATUS_LORA = "lora"
STATUS_DIFF = "diff"
STATUS_SKIPPED = "skipped"
CHANGE_BELOW = "change below threshold"   # min_change_* (change_threshold.py)


@dataclass
class LayerReport:
    key: str
    shape: list[int]
    kind: str
    status: str                          # lora / diff / skipped
    reason: str = ""                     # why skipped, or a note (e.g. "clamped at 0.0123")
    rank: int | None = None
    rel_error: float | None = None       # of the stored tensors against the difference
    rel_error_unclamped: float | None = None
    clamped_entries: int | None = None   # factor entries the clamp changed (LoRA layers)
    seconds: float = 0.0
    spectrum: list[float] = field(default_factory=list)
    energy: float | None = None          # ||dW||_F^2 of a LoRA layer (feeds the size curve)
    # DoRA output (extract/dora.py): the magnitude's axis, and the plain LoRA that fits in the
    # same bytes (its rank and error), to compare rel_error with.
    dora_axis: str | None = None
    lora_same_size_rank: int | None = None
    lora_same_size_error: float | None = None
    # Quantized inputs: the estimated rounding noise of the difference relative to ||dW||_F
    # (comparable with rel_error; None when neither side is quantized), and whether the
    # difference is at the noise level (source_info.NOISE_FLAG_FACTOR).
    noise_floor: float | None = None
    at_noise_level: bool = False
    change: float | None = None          # ||dW||_F of a paired parameter (min_change_* compare it)


@dataclass
class ExtractionSummary:
    layers: int
    lora: int
    diff: int
    skipped: int
    mean_error: float | None
    median_error: float | None
    worst_error: float | None
    worst_key: str | None
    mean_clamp_added_error: float | None
    clamped_entries: int
    clamped_layers: int
    rank_min: int | None
    rank_max: int | None
    file_bytes: int
    seconds: float
    # The same counts split by part: "diffusion_model" and "text_encoders" ({lora, diff, skipped}).
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    median_noise_floor: float | None = None   # over layers with a floor (quantized inputs)
    noise_layers: int = 0                     # layers whose difference is at the noise level


def part_of(key: str) -> str:
    """Which part of a model a report key belongs to."""
    return "text_encoders" if is_te_key(key) else "diffusion_model"


@dataclass
class ExtractionReport:
    config: dict[str, object]
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_path: str | None = None
    file_bytes: int = 0
    seconds: float = 0.0
    tensor_bytes: int = 0                  # bytes of the stored tensors (the file less its header)
    size_curve: SizeCurve | None = None    # error against size, from the spectra
    budget: BudgetOutcome | None = None    # set by a target_size_mb run
    inputs: list[str] = field(default_factory=list)  # how each model is stored (one line each)

    def add(self, layer: LayerReport) -> None:
        self.layers.append(layer)

    def summary(self) -> ExtractionSummary:
        lora = [r for r in self.layers if r.status == STATUS_LORA]
        errs = [r.rel_error for r in lora if r.rel_error is not None]
        clamp_added = [r.rel_error - r.rel_error_unclamped for r in lora
                       if r.rel_error is not None and r.rel_error_unclamped is not None]
        worst = max(lora, key=lambda r: r.rel_error or 0.0) if lora else None
        ranks = [r.rank for r in lora if r.rank is not None]
        floors = [r.noise_floor for r in self.layers if r.noise_floor is not None]
        return ExtractionSummary(
            layers=len(self.layers),
            lora=len(lora),
            diff=sum(r.status == STATUS_DIFF for r in self.layers),
            skipped=sum(r.status == STATUS_SKIPPED for r in self.layers),
            mean_error=statistics.fmean(errs) if errs else None,
            median_error=statistics.median(errs) if errs else None,
            worst_error=worst.rel_error if worst else None,
            worst_key=worst.key if worst else None,
            mean_clamp_added_error=statistics.fmean(clamp_added) if clamp_added else None,
            clamped_entries=sum(r.clamped_entries or 0 for r in lora),
            clamped_layers=sum(bool(r.clamped_entries) for r in lora),
            rank_min=min(ranks) if ranks else None,
            rank_max=max(ranks) if ranks else None,
            file_bytes=self.file_bytes,
            seconds=self.seconds,
            parts=self.part_counts(),
            median_noise_floor=statistics.median(floors) if floors else None,
            noise_layers=sum(r.at_noise_level for r in self.layers),
        )

    def part_counts(self) -> dict[str, dict[str, int]]:
        """{part: {status: layers}}, diffusion model first."""
        out: dict[str, dict[str, int]] = {}
        for r in self.layers:
            counts = out.setdefault(part_of(r.key), {STATUS_LORA: 0, STATUS_DIFF: 0, STATUS_SKIPPED: 0})
            counts[r.status] = counts.get(r.status, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: kv[0] != "diffusion_model"))

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config,
            "summary": asdict(self.summary()),
            "notes": list(self.notes),
            "output_path": self.output_path,
            "tensor_bytes": self.tensor_bytes,
            "budget": asdict(self.budget) if self.budget is not None else None,
            "inputs": list(self.inputs),
            "size_curve": asdict(self.size_curve) if self.size_curve is not None else None,
            "layers": [asdict(r) for r in self.layers],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def skipped_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.layers:
            if r.status == STATUS_SKIPPED:
                # Each layer's numbers are in its own entry; the summary counts them together.
                reason = r.reason.split(":")[0] if r.reason.startswith(CHANGE_BELOW) else r.reason
                out[reason] = out.get(reason, 0) + 1
        return out

    def _te_rank_lines(self) -> list[str]:
        """Rank range of each part, when text encoders are in the report."""
        lines = []
        for part in ("diffusion_model", "text_encoders"):
            ranks = [r.rank for r in self.layers if r.status == STATUS_LORA and r.rank is not None
                     and part_of(r.key) == part]
            if ranks:
                lines.append(f"  {part.replace('_', ' ')} rank: {min(ranks)}..{max(ranks)}")
        return lines

    def _dora_lines(self) -> list[str]:
        """DoRA against plain LoRA at the same bytes, when the layers are DoRA."""
        dora = [r for r in self.layers if r.dora_axis is not None and r.rel_error is not None
                and r.lora_same_size_error is not None]
        if not dora:
            return []
        axes = sorted({r.dora_axis for r in dora if r.dora_axis})
        mean = statistics.fmean(r.rel_error or 0.0 for r in dora)
        plain = statistics.fmean(r.lora_same_size_error or 0.0 for r in dora)
        better = sum((r.rel_error or 0.0) < (r.lora_same_size_error or 0.0) for r in dora)
        return [f"DoRA ({'/'.join(axes)} axis): mean error {mean:.4f}; plain LoRA in the same "
                f"bytes: {plain:.4f}; DoRA better on {better} of {len(dora)} layers"]

    def format_text(self, worst: int = 5) -> str:
        """A short human summary (node UI, command line)."""
        s = self.summary()
        lines = [
            f"layers: {s.layers} ({s.lora} LoRA, {s.diff} diff, {s.skipped} skipped)",
        ]
        if "text_encoders" in s.parts:
            lines.extend(f"  {part.replace('_', ' ')}: {c[STATUS_LORA]} LoRA, {c[STATUS_DIFF]} diff, "
                         f"{c[STATUS_SKIPPED]} skipped" for part, c in s.parts.items())
            lines.extend(self._te_rank_lines())
        if s.rank_min is not None:
            lines.append(f"rank: {s.rank_min}..{s.rank_max}")
        if s.mean_error is not None:
            lines.append(f"relative error: mean {s.mean_error:.4f}, median {s.median_error:.4f}, "
                         f"worst {s.worst_error:.4f} ({s.worst_key})")
        if s.median_noise_floor is not None:
            lines.append(f"quantization noise floor: median {s.median_noise_floor:.4f} of the "
                         f"difference; {s.noise_layers} layers at the noise level (a LoRA of them "
                         "is mostly rounding noise)")
        if s.mean_clamp_added_error is not None:
            lines.append(f"error added by clamp + dtype cast: mean {s.mean_clamp_added_error:+.5f}")
        if self.config.get("clamp_quantile") is not None:
            lines.append(f"clamp: {s.clamped_entries} factor entries clipped in {s.clamped_layers} "
                         "layers")
        for reason, n in sorted(self.skipped_reasons().items()):
            lines.append(f"skipped {n}: {reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(self._dora_lines())
        lines.extend(self.inputs)
        lines.extend(budget_lines(self))
        if self.output_path:
            lines.append(f"file: {self.output_path} ({s.file_bytes / 2**20:.2f} MiB)")
        lines.extend(curve_lines(self.size_curve))
        lines.append(f"time: {s.seconds:.2f} s")
        lora = sorted((r for r in self.layers if r.status == STATUS_LORA and r.rel_error is not None),
                      key=lambda r: -(r.rel_error or 0.0))[:worst]
        if lora:
            lines.append("worst layers:")
            lines.extend(f"  {r.rel_error:.4f}  rank {r.rank}  {r.key}"
                         + (f"  (noise floor {r.noise_floor:.4f})" if r.noise_floor is not None
                            else "") for r in lora)
        return "\n".join(lines)
