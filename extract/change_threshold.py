"""Skip layers that barely changed: a threshold on ``||dW||`` and on ``||dW|| / ||W||``.

Skipping is on when ``min_change_rel`` or ``min_change_abs`` is above 0. A changed parameter is
then left out (reported with its change) when

    ||dW||_F < min_change_abs   or   ||dW||_F < min_change_rel * ||W||_F     (W: the base weight)

With quantized inputs and no ``min_change_abs`` of its own, the absolute threshold is the pair's
default (``default_min_change``): its quantization noise floor times ``NOISE_FACTOR``, as the
noise-floor estimate of the quantized readers gives it (``PairPlan.noise_floor``, None for
unquantized pairs), so a layer whose change is mostly the two files' rounding noise counts as
unchanged. The relative test reads each base weight's norm once (cached on the plan).
"""

from __future__ import annotations

import math

from .config import ExtractConfig
from .pairing import KeyPair, PairPlan
from .report import CHANGE_BELOW
from .source_info import NOISE_FLAG_FACTOR

# A difference at most this many times its estimated rounding noise counts as unchanged: the
# same factor that flags a layer as at the noise level in the report.
NOISE_FACTOR = NOISE_FLAG_FACTOR


def default_min_change(pair: KeyPair, plan: PairPlan) -> float | None:
    """The absolute threshold for ``pair`` when the user gave none: the noise floor of a
    quantized pair times ``NOISE_FACTOR``; None when neither side is quantized (or the plan's
    sources give no noise estimate)."""
    noise_floor = plan.noise_floor
    if noise_floor is None:
        return None
    floor = noise_floor(pair)
    return None if floor is None else NOISE_FACTOR * float(floor)


def skipping_on(cfg: ExtractConfig) -> bool:
    return cfg.min_change_rel > 0 or cfg.min_change_abs > 0


def small_change_reason(pair: KeyPair, fro: float, cfg: ExtractConfig, plan: PairPlan
                        ) -> str | None:
    """Why ``process_pair`` leaves this changed parameter out as unchanged, or None."""
    if not skipping_on(cfg) or fro == 0.0 or math.isinf(fro):   # inf: "assume it changed"
        return None
    absolute = cfg.min_change_abs
    source = "min_change_abs"
    if absolute <= 0:
        absolute = default_min_change(pair, plan) or 0.0
        source = "the quantization noise floor x1.5"
    if fro < absolute:
        return f"{CHANGE_BELOW}: ||dW|| {fro:.4g} < {absolute:.4g} ({source})"
    if cfg.min_change_rel > 0 and plan.base_norm is not None:
        w = plan.base_norm(pair)
        if w > 0 and fro < cfg.min_change_rel * w:
            return (f"{CHANGE_BELOW}: ||dW||/||W|| {fro / w:.4g} < {cfg.min_change_rel:g} "
                    f"(min_change_rel; ||dW|| {fro:.4g})")
    return None
