"""Pair the keys of a base and a fine-tuned source, and compute their differences.

Every key of either model is classified here once, before any work, so a mismatch between the
two models is reported before minutes of SVD, and no key can fall through the cracks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .difference import difference_into
from .difference_pool import DifferencePool
from .errors import ExtractionInputError
from .file_difference import ChunkBuffers, host_difference
from .keys.te_keys import encoders_in, left_out_reason, model_path
from .norms import frobenius_norm
from .selection import SelectionOutcome
from .source_info import describe, noise_floor
from .sources import WeightSource

# Keys ComfyUI adds next to quantized weights; they are not parameters of the network.
SYNTHETIC_SUFFIXES = (".weight_scale", ".comfy_quant", ".input_scale", ".scale_weight",
                      ".scale_input", ".weight_scale_2", ".pre_quant_scale")
ONLY_TUNED = "only in the fine-tuned model"


@dataclass(frozen=True)
class KeyPair:
    """One parameter present in both models."""

    tuned_key: str
    base_key: str
    path: str                     # diffusion-model parameter path, or text_encoders.<CLIP key>
    shape: tuple[int, ...]


@dataclass
class PairPlan:
    """The keys to process, and those left out with the reason."""

    common: list[KeyPair] = field(default_factory=list)
    left_out: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    weight_paths: set[str] = field(default_factory=set)
    # Modules that contain sub-modules. ComfyUI's loader never patches parameters that sit
    # directly on such modules (e.g. WAN ``blocks.N.modulation``, a DiT root ``pos_embed``).
    nonleaf_modules: set[str] = field(default_factory=set)
    # Parameters ComfyUI's loader cannot apply in the diffusers key style, with the reason; set
    # by key_style.resolve_for_plan when it resolves the key style to diffusers.
    comfy_unmapped: dict[str, str] = field(default_factory=dict)
    encoders: tuple[str, ...] = ()  # text encoders paired (clip_l, clip_g, t5xxl...)
    # How each model is stored, one line each ("base: ...", "fine-tuned: ..."), for the report.
    inputs: list[str] = field(default_factory=list)
    # The rounding-noise norm of a pair's difference when either side is quantized, else None
    # (source_info.noise_floor over the two sources; asked after the difference was read).
    noise_floor: Callable[[KeyPair], float | None] | None = None
    # Parameters only the fine-tuned model has (base_key ""); also in left_out until
    # plan_options.plan_for decides to store them (new_tensors.py).
    tuned_only: list[KeyPair] = field(default_factory=list)
    # ||W|| of a pair's base weight (read on demand, cached), for min_change_rel; set by plan_for.
    base_norm: Callable[[KeyPair], float] | None = None
    selection: SelectionOutcome | None = None   # what the layer selection kept (plan_for)

    def module_has_weight(self, path: str) -> bool:
        """Whether ``<module>.weight`` exists next to a ``<module>.bias`` path."""
        return path.rsplit(".", 1)[0] + ".weight" in self.weight_paths

    def on_nonleaf_module(self, path: str) -> bool:
        """Whether the parameter's owning module also has child modules."""
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        return parent in self.nonleaf_modules


def plan_pair(base: WeightSource, tuned: WeightSource) -> PairPlan:
    """Match keys by diffusion path; refuse empty, disjoint or shape-mismatched models."""
    base_keys = base.keys()
    tuned_keys = tuned.keys()
    for src, keys in ((base, base_keys), (tuned, tuned_keys)):
        if not keys:
            raise ExtractionInputError(f"{src.name}: the model has no weights. Check the file.")
    check_same_text_encoders(base, base_keys, tuned, tuned_keys)
    # Keys a source knows must not be extracted (e.g. a CLIP weight ComfyUI leaves
    # uninitialised), with the reason: reported, never paired.
    skip = {**_left_out_keys(base), **_left_out_keys(tuned)}
    plan = PairPlan()
    base_by_path: dict[str, str] = {}
    for k in base_keys:
        p = model_path(k)
        if p is not None:
            base_by_path[p] = k
    seen_base: set[str] = set()
    for k in tuned_keys:
        p = model_path(k)
        if k in skip:
            plan.left_out.append((k, tuple(tuned.shape(k)), skip[k]))
            seen_base.add(base_by_path.get(p or "", ""))
            continue
        if p is None:
            plan.left_out.append((k, tuple(tuned.shape(k)), left_out_reason(k)))
            continue
        if k.endswith(SYNTHETIC_SUFFIXES):
            plan.left_out.append((k, tuple(tuned.shape(k)), "quantization metadata, not a weight"))
            seen_base.add(base_by_path.get(p, ""))
            continue
        bk = base_by_path.get(p)
        if bk is None:
            plan.left_out.append((k, tuple(tuned.shape(k)), ONLY_TUNED))
            plan.tuned_only.append(KeyPair(k, "", p, tuple(tuned.shape(k))))
            continue
        seen_base.add(bk)
        ts, bs = tuple(tuned.shape(k)), tuple(base.shape(bk))
        if ts != bs:
            raise ExtractionInputError(
                f"key {k!r} has shape {list(ts)} in {tuned.name} but {list(bs)} in {base.name}: "
                "the models are not the same architecture. Pick the matching base model.")
        plan.common.append(KeyPair(k, bk, p, ts))
    # A key under the same name in both models (a VAE weight) is reported once, from the
    # fine-tuned model, not once per model.
    reported = {k for k, _shape, _reason in plan.left_out}
    for k in base_keys:
        if k in seen_base or k in reported:
            continue
        p = model_path(k)
        reason = (left_out_reason(k) if p is None
                  else "quantization metadata, not a weight" if k.endswith(SYNTHETIC_SUFFIXES)
                  else "only in the base model")
        plan.left_out.append((k, tuple(base.shape(k)), reason))
    if not plan.common:
        raise ExtractionInputError(
            f"{tuned.name} and {base.name} share no weight keys: they are different "
            f"architectures (e.g. {tuned_keys[0]!r} vs {base_keys[0]!r}). Pick the matching base model.")
    plan.encoders = encoders_in(kp.path for kp in plan.common)
    plan.inputs = [describe(base, "base"), describe(tuned, "fine-tuned")]
    plan.noise_floor = lambda kp: noise_floor(base, kp.base_key, tuned, kp.tuned_key)
    plan.weight_paths = {kp.path for kp in plan.common if kp.path.endswith(".weight")}
    for kp in plan.common:
        parts = kp.path.split(".")
        # Every proper ancestor of the owning module has a child module (root included: "").
        plan.nonleaf_modules.add("")
        plan.nonleaf_modules.update(".".join(parts[: j + 1]) for j in range(len(parts) - 2))
    return plan


def _left_out_keys(source: WeightSource) -> dict[str, str]:
    fn = getattr(source, "left_out_keys", None)
    return fn() if callable(fn) else {}


def check_same_text_encoders(base: WeightSource, base_keys: list[str], tuned: WeightSource,
                             tuned_keys: list[str]) -> None:
    """A text encoder in only one of the models is an input error, never a half extraction."""
    in_base, in_tuned = encoders_in(base_keys), encoders_in(tuned_keys)
    if in_base == in_tuned:
        return
    only = [(e, tuned, base) for e in in_tuned if e not in in_base] + \
           [(e, base, tuned) for e in in_base if e not in in_tuned]
    enc, has, lacks = only[0]
    raise ExtractionInputError(
        f"text encoder {enc} is in {has.name} but not in {lacks.name} (text encoders: "
        f"{', '.join(in_tuned) or 'none'} in {tuned.name}, {', '.join(in_base) or 'none'} in "
        f"{base.name}). Pick models with the same text encoders, or extract without them "
        "(command line: --no-text-encoder; nodes: leave the CLIP inputs unconnected).")


def load_difference(base: WeightSource, tuned: WeightSource, tuned_key: str, base_key: str,
                    device: str | torch.device = "cpu", pool: DifferencePool | None = None,
                    buffers: ChunkBuffers | None = None) -> tuple[torch.Tensor, float]:
    """``tuned - base`` in float32 on ``device`` and its Frobenius norm.

    On the CPU (``host_difference``; from two files chunk by chunk straight from their bytes,
    the norm in the same pass) into a buffer from ``pool`` if given (with ``buffers``, the
    caller's reused read buffers). A NaN or Inf in either model is an input error naming the
    key and the model.
    """
    if torch.device(device).type == "cpu":
        shape = tuple(tuned.shape(tuned_key))
        diff = pool.take(shape) if pool is not None else torch.empty(shape, dtype=torch.float32)
        # NaN and Inf stay what they are through the square root.
        fro = math.sqrt(host_difference(tuned, tuned_key, base, base_key, diff, buffers))
    else:
        diff = tuned.get(tuned_key, device, torch.float32)
        b = base.get(base_key, device)
        # In place, upcasting b chunk by chunk: no second float32 buffer of the layer's size.
        difference_into(diff, None, b)
        del b
        fro = frobenius_norm(diff)
    if fro != fro or fro == float("inf"):
        for src, k in ((tuned, tuned_key), (base, base_key)):
            if not bool(torch.isfinite(src.get(k, "cpu", torch.float32)).all()):
                raise ExtractionInputError(
                    f"key {k!r} in {src.name} contains NaN or Inf values; the model file is "
                    "broken. Re-download or re-save it.")
        raise ExtractionInputError(
            f"key {tuned_key!r}: the difference overflows float32; the models are not a "
            "base/fine-tune pair.")
    return diff, fro
