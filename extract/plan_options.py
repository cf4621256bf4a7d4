"""The pairing as the options shape it: the layer selection, fine-tune-only tensors, base norms.

``plan_for`` is what every extraction engine (V1, size budget, dry run, V2) pairs the models
with: ``plan_pair`` (keys and shapes only), then the selection (``selection.py``) moves every
parameter it leaves out from the work list to the report's left-out list with its reason, before
any weight is read.
"""

from __future__ import annotations

import threading

import torch

from .config import ExtractConfig
from .errors import ExtractionInputError
from .norms import frobenius_norm
from .pairing import ONLY_TUNED, KeyPair, PairPlan, plan_pair
from .selection import SelectionOutcome, check_selection_options, names_of, select
from .sources import WeightSource


def plan_for(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig) -> PairPlan:
    plan = plan_pair(base, tuned)
    apply_selection(plan, cfg)
    if cfg.new_tensors != "skip":
        # Reported by store_new_tensors (stored, or left out with the reason), not here.
        stored = {p.tuned_key for p in plan.tuned_only}
        plan.left_out = [x for x in plan.left_out if not (x[0] in stored and x[2] == ONLY_TUNED)]
    plan.base_norm = _cached_base_norms(base)
    return plan


def apply_selection(plan: PairPlan, cfg: ExtractConfig) -> SelectionOutcome | None:
    """Filter ``plan.common`` and ``plan.tuned_only`` by the selection; None when it is off."""
    selection = check_selection_options(cfg.layer_preset, cfg.include, cfg.exclude)
    if not selection.active:
        return None
    total = len(plan.common)
    kept, dropped, outcome = select(plan.common, selection,
                                    lambda kp: names_of(kp.path, kp.tuned_key), lambda kp: kp.shape)
    if not kept:
        example = plan.common[0].path if plan.common else "-"
        raise ExtractionInputError(
            f"the layer selection (layer_preset {cfg.layer_preset!r}, include {cfg.include!r}, "
            f"exclude {cfg.exclude!r}) leaves none of the {total} paired parameters (e.g. "
            f"{example!r}). Patterns match parameter paths like that one or the file's keys; "
            "loosen them, or use layer_preset 'all'.")
    plan.common = kept
    plan.left_out.extend((kp.tuned_key, kp.shape, reason) for kp, reason in dropped)
    new_kept, new_dropped, _ = select(plan.tuned_only, selection,
                                      lambda kp: names_of(kp.path, kp.tuned_key),
                                      lambda kp: kp.shape)
    plan.tuned_only = new_kept
    dropped_new = {kp.tuned_key: reason for kp, reason in new_dropped}
    plan.left_out = [(k, s, dropped_new.get(k, r)) for k, s, r in plan.left_out]
    plan.selection = outcome
    return outcome


def _cached_base_norms(base: WeightSource):
    lock = threading.Lock()
    cache: dict[str, float] = {}

    def base_norm(pair: KeyPair) -> float:
        with lock:
            if pair.tuned_key in cache:
                return cache[pair.tuned_key]
        value = frobenius_norm(base.get(pair.base_key, "cpu", torch.float32))
        with lock:
            cache[pair.tuned_key] = value
        return value
    return base_norm
