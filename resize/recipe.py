"""Score recipes: ``fro_ckpt=0.75,spn_lora=0.25,size=6`` and friends, parsed and named.

A recipe weights one or more scoring methods (weights normalised to sum 1; a method without a
value weighs 1) and picks dimensions either by threshold (``thr=X``: keep score >= X) or by
output size (``size=Y`` MiB). ``rank=N`` caps every layer at its N best dimensions, on its own
(``rank=32``: a fixed rank, no scoring method needed) or on top of thr/size. ``rescale=Z``
multiplies the LoRA (default 1). Several recipes are separated by ``:`` and share one
decomposition.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from ..extract.errors import ExtractionInputError

# Method -> short name used in output file names.
METHODS: dict[str, str] = {
    "fro_ckpt": "frockpt",
    "fro_lora": "frolora",
    "params": "params",
    "spn_ckpt": "spnckpt",
    "spn_lora": "spnlora",
    "subspace": "subspace",
}
DEFAULT_RECIPES = "fro_ckpt=1,thr=-3.5"


def format_number(v: float) -> str:
    """Short form for names: 6 -> '6', 0.8 -> '0.8', 0.004 -> '0.004' (never rounded to 0)."""
    return f"{v:.6g}"


def format_threshold(t: float) -> str:
    if math.isinf(t):
        return "-inf" if t < 0 else "inf"
    return f"{t:.2f}"


@dataclass(frozen=True)
class Recipe:
    text: str
    weights: tuple[tuple[str, float], ...]   # normalised, sorted by method name, non-zero only
    threshold: float | None
    size_mib: float | None
    rescale: float
    max_rank: int | None = None

    def weight(self, method: str) -> float:
        return dict(self.weights).get(method, 0.0)

    @property
    def needs_spectral(self) -> bool:
        return self.weight("spn_ckpt") != 0.0

    @property
    def needs_subspace(self) -> bool:
        return self.weight("subspace") != 0.0

    def details(self) -> str:
        """``frockpt0.75_spnlora0.25[_scale0.8][_size6]`` for the output name."""
        parts = [f"{METHODS[m]}{w:.2f}" for m, w in self.weights]
        if self.rescale != 1.0:
            parts.append(f"scale{format_number(self.rescale)}")
        if self.size_mib is not None:
            parts.append(f"size{format_number(self.size_mib)}")
        if self.max_rank is not None:
            parts.append(f"rank{self.max_rank}")
        return "_".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _bad(recipe: str, why: str) -> ExtractionInputError:
    return ExtractionInputError(
        f"score recipe {recipe!r}: {why}. Write e.g. 'fro_ckpt=1,thr=-3.5' or "
        f"'spn_ckpt=0.8,params=0.2,size=32'; methods: {', '.join(METHODS)}; selection: thr= or "
        "size= and/or rank=N; optional rescale=.")


def _number(recipe: str, key: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise _bad(recipe, f"{key}={value!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(recipe, f"{key}={value!r} is not finite")
    return v


def parse_recipe(text: str) -> Recipe:
    text = text.strip()
    if not text:
        raise _bad(text, "it is empty")
    raw: dict[str, float] = {}
    threshold = size = None
    max_rank: int | None = None
    rescale = 1.0
    for part in text.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if key in METHODS:
            if key in raw:
                raise _bad(text, f"{key} is given twice")
            w = 1.0 if not eq else _number(text, key, value)
            if w < 0:
                raise _bad(text, f"weight {key}={value} is negative")
            raw[key] = w
        elif key == "rank":
            v = _number(text, key, value) if value else 0.0
            if v < 1 or v != int(v):
                raise _bad(text, f"rank={value} must be a whole number >= 1")
            max_rank = int(v)
        elif key in ("thr", "size", "rescale"):
            if not value:
                raise _bad(text, f"{key} needs a value ({key}=...)")
            v = _number(text, key, value)
            if key == "thr":
                threshold = v
            elif key == "size":
                if v <= 0:
                    raise _bad(text, f"size={value} must be a positive number of MiB")
                size = v
            else:
                if v <= 0:
                    raise _bad(text, f"rescale={value} must be positive")
                rescale = v
        else:
            raise _bad(text, f"unknown key {key!r}")
    if threshold is not None and size is not None:
        raise _bad(text, "give exactly one of thr= and size= (rank=N may cap either)")
    if threshold is None and size is None:
        if max_rank is None:
            raise _bad(text, "give exactly one of thr= and size=, or rank=N alone")
        threshold = -math.inf   # rank alone: every layer keeps its best max_rank dimensions
        if not raw:
            raw["fro_lora"] = 1.0   # ranks within a layer do not depend on the method
    total = sum(raw.values())
    if total <= 0:
        raise _bad(text, "no scoring method with a positive weight")
    weights = tuple(sorted((m, w / total) for m, w in raw.items() if w > 0))
    return Recipe(text=text, weights=weights, threshold=threshold, size_mib=size, rescale=rescale,
                  max_rank=max_rank)


def parse_recipes(text: str) -> list[Recipe]:
    """Recipes separated by ':' (each validated before any heavy work starts)."""
    if not text or not text.strip():
        text = DEFAULT_RECIPES
    return [parse_recipe(part) for part in text.split(":")]
