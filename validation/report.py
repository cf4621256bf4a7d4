"""Typed result of a LoRA validation: one entry per shared weight, and a summary.

Quality bands follow the usual reading of the relative error of a reconstruction: below 5%
excellent, 5-50% good, 50-100% poor, above 100% worse than leaving the layer out.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field

STATUS_COVERED = "covered"          # changed by the fine-tune and patched by the LoRA
STATUS_UNCOVERED = "uncovered"      # changed by the fine-tune, no LoRA patch
STATUS_UNCHANGED = "unchanged"      # same in both models, no LoRA patch (nothing to do)
STATUS_SPURIOUS = "spurious"        # same in both models, but the LoRA changes it
STATUS_NOT_MERGED = "not_merged"    # a patch ComfyUI would log and skip (shape mismatch...)

# (name, upper bound of the relative error, inclusive), in order.
QUALITY_BANDS: tuple[tuple[str, float], ...] = (
    ("excellent", 0.05), ("good", 0.5), ("poor", 1.0), ("worse than nothing", math.inf),
)


# A LoRA of the opposite sign (base and fine-tuned swapped, when extracting or validating) adds
# its difference instead of cancelling it: ||d + L|| / ||d|| = sqrt(1 + 3c) for a truncated SVD L
# keeping the share c of the difference's energy, so 200% for a faithful LoRA and above 158% once
# it keeps half the energy. An unrelated patch of the same norm gives ~141%, below this band.
SWAPPED_BAND = (1.6, 2.05)


def quality_band(rel_error: float) -> str:
    """The band name of a relative error (< 5% excellent ... > 100% worse than nothing)."""
    for name, upper in QUALITY_BANDS:
        if rel_error < upper or (upper == 1.0 and rel_error == 1.0):
            return name
    return QUALITY_BANDS[-1][0]


@dataclass
class LayerValidation:
    key: str
    path: str
    shape: list[int]
    kind: str
    status: str
    delta_norm: float                  # ||W_tuned - W_base||
    rank: int | None = None            # rank of the LoRA patch, if it is a LoRA (not a diff)
    rel_error: float | None = None     # ||W_base + dW_lora - W_tuned|| / ||W_tuned - W_base||
    residual_norm: float | None = None
    note: str = ""
    spectrum: list[float] = field(default_factory=list)  # leading singular values of the true delta


@dataclass
class ValidationSummary:
    layers: int                 # weights both models have
    changed: int                # of those, weights the fine-tune changed
    covered: int                # changed weights the LoRA patches
    uncovered: int
    not_merged: int
    spurious: int
    coverage: float | None      # covered / changed
    unmatched_keys: int         # LoRA keys ComfyUI would log as "lora key not loaded"
    text_encoder_keys: int
    mean_error: float | None    # over covered layers
    median_error: float | None
    worst_error: float | None
    worst_key: str | None
    overall_error: float | None  # whole model: sqrt(sum residual^2) / sqrt(sum delta^2)
    success_rate: float | None   # share of changed layers with error below 50% (good or better)
    bands: dict[str, int]
    seconds: float


@dataclass
class ValidationReport:
    lora_name: str
    base_name: str
    tuned_name: str
    layers: list[LayerValidation] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)
    text_encoder_keys: list[str] = field(default_factory=list)
    key_styles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def changed(self) -> list[LayerValidation]:
        return [r for r in self.layers if r.delta_norm > 0]

    def worst_layers(self, n: int = 10) -> list[LayerValidation]:
        """Changed layers with the largest relative error (uncovered ones count as 1.0)."""
        rows = [r for r in self.changed() if r.rel_error is not None]
        return sorted(rows, key=lambda r: (-(r.rel_error or 0.0), r.path))[:n]

    def looks_swapped(self) -> bool:
        """Most covered layers sit near 200% error: the LoRA has the opposite sign."""
        errs = [r.rel_error for r in self.changed()
                if r.status == STATUS_COVERED and r.rel_error is not None]
        lo, hi = SWAPPED_BAND
        return bool(errs) and 2 * sum(lo <= e <= hi for e in errs) > len(errs)

    def summary(self) -> ValidationSummary:
        changed = self.changed()
        covered = [r for r in changed if r.status == STATUS_COVERED]
        errs = [r.rel_error for r in covered if r.rel_error is not None]
        worst = max(covered, key=lambda r: r.rel_error or 0.0) if covered else None
        bands = {name: 0 for name, _ in QUALITY_BANDS}
        for r in changed:
            if r.rel_error is not None:
                bands[quality_band(r.rel_error)] += 1
        res2 = sum((r.residual_norm or 0.0) ** 2 for r in changed if r.residual_norm is not None)
        res2 += sum(r.delta_norm ** 2 for r in changed if r.status == STATUS_NOT_MERGED)
        delta2 = sum(r.delta_norm ** 2 for r in changed)
        good = sum(1 for r in changed if r.rel_error is not None and r.rel_error < 0.5)
        return ValidationSummary(
            layers=len(self.layers), changed=len(changed), covered=len(covered),
            uncovered=sum(r.status == STATUS_UNCOVERED for r in changed),
            not_merged=sum(r.status == STATUS_NOT_MERGED for r in self.layers),
            spurious=sum(r.status == STATUS_SPURIOUS for r in self.layers),
            coverage=len(covered) / len(changed) if changed else None,
            unmatched_keys=len(self.unmatched_keys), text_encoder_keys=len(self.text_encoder_keys),
            mean_error=statistics.fmean(errs) if errs else None,
            median_error=statistics.median(errs) if errs else None,
            worst_error=worst.rel_error if worst else None, worst_key=worst.key if worst else None,
            overall_error=math.sqrt(res2 / delta2) if delta2 > 0 else None,
            success_rate=good / len(changed) if changed else None,
            bands=bands, seconds=self.seconds,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "lora": self.lora_name, "base": self.base_name, "tuned": self.tuned_name,
            "summary": asdict(self.summary()), "key_styles": list(self.key_styles),
            "unmatched_keys": list(self.unmatched_keys),
            "text_encoder_keys": list(self.text_encoder_keys), "notes": list(self.notes),
            "worst_layers": [{"key": r.key, "status": r.status, "rel_error": r.rel_error, "rank": r.rank}
                             for r in self.worst_layers()],
            "layers": [asdict(r) for r in self.layers],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self, worst: int = 8, unmatched: int = 5) -> str:
        """A short human summary (node UI, command line)."""
        s = self.summary()
        lines = [f"validated {self.lora_name} against {self.tuned_name} - {self.base_name}"]
        if s.coverage is not None:
            lines.append(f"coverage: {s.covered}/{s.changed} changed weights patched "
                         f"({100 * s.coverage:.1f}%), {s.uncovered} uncovered")
        else:
            lines.append("coverage: the two models do not differ")
        if s.mean_error is not None:
            lines.append(f"relative error: mean {100 * s.mean_error:.2f}%, median "
                         f"{100 * s.median_error:.2f}%, worst {100 * s.worst_error:.2f}% ({s.worst_key})")
        if s.overall_error is not None:
            lines.append(f"whole model error: {100 * s.overall_error:.2f}%  success rate "
                         f"(< 50%): {100 * (s.success_rate or 0.0):.1f}%")
        lines.append("quality: " + ", ".join(f"{n} {c}" for n, c in s.bands.items()))
        if self.looks_swapped():
            lines.append("WARNING most layers are near 200% error: the LoRA adds the opposite of "
                         "TUNED - BASE. Base and fine-tuned look swapped, here or when the LoRA "
                         "was extracted: give the base model first, then the fine-tuned one.")
        if s.unmatched_keys:
            lines.append(f"WARNING {s.unmatched_keys} LoRA keys match no model weight "
                         "(ComfyUI: 'lora key not loaded'):")
            lines.extend(f"  {k}" for k in self.unmatched_keys[:unmatched])
            if s.unmatched_keys > unmatched:
                lines.append(f"  ... and {s.unmatched_keys - unmatched} more")
        if s.text_encoder_keys:
            lines.append(f"{s.text_encoder_keys} text-encoder keys (not checked)")
        if s.not_merged:
            lines.append(f"WARNING {s.not_merged} patches ComfyUI would not merge")
        if s.spurious:
            lines.append(f"WARNING {s.spurious} unchanged weights changed by the LoRA")
        lines.extend(f"note: {n}" for n in self.notes)
        rows = self.worst_layers(worst)
        if rows:
            lines.append("worst layers:")
            lines.extend(f"  {100 * (r.rel_error or 0.0):7.2f}%  {r.status:<10} rank {r.rank if r.rank is not None else '-':>4}  {r.key}"
                         for r in rows)
        lines.append(f"time: {s.seconds:.2f} s")
        return "\n".join(lines)
