"""Typed resize report: per recipe, per layer ranks and errors; what was skipped and why."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class LayerResize:
    prefix: str
    base_key: str
    old_rank: int
    new_rank: int
    rle_lora: float      # ||dropped sigma|| / ||all sigma||
    rle_ckpt: float      # ||dropped sigma|| / ||W_base||_F

    def line(self) -> str:
        return (f"dim:{self.old_rank:>4}->{self.new_rank:<4} rle_lora:{100.0 * self.rle_lora:>6.2f}% "
                f"rle_ckpt:{100.0 * self.rle_ckpt:>6.2f}% {self.prefix}")


@dataclass
class RecipeOutcome:
    recipe: str
    threshold: float
    output_path: str
    file_bytes: int
    kept_bytes: int
    rank_before: int
    rank_after: int
    layers: list[LayerResize] = field(default_factory=list)
    quantiles: list[tuple[float, float]] = field(default_factory=list)

    def quantile_text(self) -> str:
        return " ".join(f"{q:.2f}:{v:.3f}" for q, v in self.quantiles)

    def summary_line(self) -> str:
        dropped = sum(1 for lr in self.layers if lr.new_rank == 0)
        return (f"{self.recipe}: threshold {self.threshold:.3f}, total rank {self.rank_before} -> "
                f"{self.rank_after}, {dropped} layers dropped entirely, "
                f"{self.file_bytes / (1 << 20):.2f} MiB -> {self.output_path}")


    def nothing_reduced_hint(self) -> str:
        """Why a recipe kept every dimension, and what would make it cut."""
        if math.isinf(self.threshold):
            return ("nothing was reduced: the whole LoRA fits in the recipe's size; give a "
                    "smaller size=MiB.")
        median = dict(self.quantiles).get(0.5)
        example = f"thr={median:.2f} (the median score: keeps about half)" if median is not None \
            else "a higher thr="
        return (f"nothing was reduced: every dimension scored at or above the threshold "
                f"{self.threshold:.3f}. Raise it, e.g. {example}, or give a target size "
                "(size=MiB).")


@dataclass
class ResizeReport:
    lora: str
    base: str
    layers: int = 0
    zero_layers: list[str] = field(default_factory=list)       # all-zero: skipped with a warning
    unmapped: list[str] = field(default_factory=list)          # no base layer: copied unchanged
    passthrough: list[str] = field(default_factory=list)       # full-weight patches copied
    converted: dict[str, str] = field(default_factory=dict)    # LoKr/LoHa/DoRA/diff -> LoRA
    merged_styles: dict[str, list[str]] = field(default_factory=dict)  # same weight, other key names
    norms_computed: int = 0
    norms_cached: int = 0
    cache_path: str | None = None
    seconds: float = 0.0
    outcomes: list[RecipeOutcome] = field(default_factory=list)

    @property
    def output_paths(self) -> list[str]:
        return [o.output_path for o in self.outcomes]

    def to_json(self) -> str:
        def clean(v: object) -> object:
            if isinstance(v, float) and math.isinf(v):
                return "-inf" if v < 0 else "inf"
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v
        return json.dumps(clean(asdict(self)), indent=1)

    def format_text(self, per_layer: bool = False) -> str:
        lines = [f"{self.lora} against {self.base}: {self.layers} LoRA layers, "
                 f"base norms {self.norms_cached} cached / {self.norms_computed} computed, "
                 f"{self.seconds:.1f} s"]
        if self.zero_layers:
            lines.append(f"all-zero layers skipped ({len(self.zero_layers)}): "
                         + ", ".join(self.zero_layers[:5]) + (" ..." if len(self.zero_layers) > 5 else ""))
        if self.unmapped:
            lines.append(f"layers with no base weight, copied unresized ({len(self.unmapped)}): "
                         + ", ".join(self.unmapped[:5]) + (" ..." if len(self.unmapped) > 5 else ""))
        if self.converted:
            kinds: dict[str, int] = {}
            for label in self.converted.values():
                kinds[label] = kinds.get(label, 0) + 1
            lines.append("converted to LoRA (error per layer: rle_lora): "
                         + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        if self.merged_styles:
            lines.append(f"layers merged across key styles: {len(self.merged_styles)} (e.g. "
                         + ", ".join(f"{p} + {' + '.join(o)}"
                                     for p, o in list(self.merged_styles.items())[:2]) + ")")
        if self.passthrough:
            lines.append(f"full-weight patches copied unchanged: {len(self.passthrough)}")
        for o in self.outcomes:
            lines.append(o.summary_line())
            if o.rank_after == o.rank_before and o.layers:
                lines.append("  " + o.nothing_reduced_hint())
            if o.quantiles:
                lines.append(f"  score quantiles: {o.quantile_text()}")
            if per_layer:
                lines.extend("  " + lr.line() for lr in o.layers)
        return "\n".join(lines)
