"""One changed parameter into output tensors and its report line, and the tests that say, before
a layer runs, what that will store (every engine decides the same way: V1, the size budget's
passes, the block-swap engine and the dry run)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch

from .change_threshold import small_change_reason
from .config import ExtractConfig
from .dora import extract_dora_matrix
from .errors import ExtractionInputError
from .keys.te_keys import UNPATCHABLE_NOTE, lora_keys_for
from .layer import LayerExtraction, extract_matrix, layer_kind
from .layer_config import layer_config
from .norms import frobenius_norm
from .pairing import KeyPair, PairPlan
from .report import STATUS_DIFF, STATUS_LORA, STATUS_SKIPPED, LayerReport
from .source_info import NOISE_FLAG_FACTOR

# base_weight(device): the layer's base weight in float32 on ``device`` (DoRA output needs it).
BaseWeightFn = Callable[[torch.device], torch.Tensor]


# Measured against ComfyUI 0.3.64 and the 2026-08 code: its loader accepts these keys without a
# warning but only patches parameters of leaf modules. Say so instead of letting it pass silently.
NONLEAF_NOTE = ("stored as .diff, but ComfyUI's loader does not apply diffs to parameters of "
                "modules that have sub-modules (it ignores them silently); load the LoRA with "
                "'Load LoRA (complete)' to apply them")


def layer_generator(cfg: ExtractConfig, key: str) -> torch.Generator:
    """The random generator for one layer's sketch (every engine draws the same one)."""
    # Seeded per key: the same layer gets the same sketch whatever order layers run in.
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(key.encode()))


def _cast_checked(t: torch.Tensor, cfg: ExtractConfig, key: str) -> torch.Tensor:
    out = t.to(cfg.torch_dtype).contiguous().cpu()
    if not bool(torch.isfinite(out).all()):
        raise ExtractionInputError(
            f"key {key!r}: values overflow {cfg.output_dtype}; use output_dtype bf16 or fp32.")
    return out


def extract_layer(pair: KeyPair, diff: torch.Tensor, fro: float, cfg: ExtractConfig,
                  base_weight: BaseWeightFn | None) -> LayerExtraction:
    """One matrix's factors: plain LoRA, or DoRA (factors and magnitude) with ``cfg.dora`` on.

    Shared by V1 (``process_pair``) and the V2 manager so both store the same tensors.
    """
    layer_cfg = layer_config(cfg, pair.path)
    gen = layer_generator(cfg, pair.path)
    if cfg.dora == "off":
        return extract_matrix(diff, layer_cfg, fro=fro, generator=gen)
    if base_weight is None:
        raise ValueError(f"{pair.tuned_key!r}: DoRA output needs the base weight")
    return extract_dora_matrix(diff, base_weight(diff.device), layer_cfg, cfg.dora, fro=fro,
                               generator=gen)


NOISE_SKIP_REASON = (f"at the quantization noise floor (difference norm at most "
                     f"{NOISE_FLAG_FACTOR}x the estimated rounding noise); left out "
                     "(skip_noise_layers)")


def _mark_noise(entry: LayerReport, pair: KeyPair, fro: float, plan: PairPlan) -> bool:
    """Set the layer's relative noise floor; whether its difference is at the noise level."""
    floor = plan.noise_floor(pair) if plan.noise_floor is not None else None
    if floor is None:
        return False
    entry.noise_floor = floor / fro
    entry.at_noise_level = fro <= NOISE_FLAG_FACTOR * floor
    return entry.at_noise_level


def stored_role(pair: KeyPair, cfg: ExtractConfig, plan: PairPlan) -> str | None:
    """The role ``process_pair`` stores a changed parameter under (``weight``, ``bias`` or
    ``param``), or None when it leaves it out: no loader key (a text encoder's
    ``logit_scale``) or, in the diffusers style, no key ComfyUI maps. For the passes that must
    decide as ``process_pair`` does before it runs (the V2 batches, a budget's first pass)."""
    if pair.path in plan.comfy_unmapped:
        return None
    mapped = lora_keys_for(pair.path, cfg.key_style, plan.module_has_weight(pair.path),
                           plan.encoders)
    return None if mapped is None else mapped[1]


def left_out_as_noise(pair: KeyPair, fro: float, cfg: ExtractConfig, plan: PairPlan) -> bool:
    """Whether ``process_pair`` leaves this parameter out as quantization noise
    (``skip_noise_layers``): it then stores nothing, so no budget may count it either."""
    if not cfg.skip_noise_layers or fro == 0.0:
        return False
    probe = LayerReport(key=pair.tuned_key, shape=list(pair.shape), kind="", status="")
    return _mark_noise(probe, pair, fro, plan)


def needs_svd(pair: KeyPair, fro: float, cfg: ExtractConfig, plan: PairPlan) -> bool:
    """Whether ``process_pair`` stores this parameter as LoRA factors (the same test)."""
    if fro == 0.0 or cfg.lora_type == "full" or len(pair.shape) < 2:
        return False
    if left_out_as_noise(pair, fro, cfg, plan):
        return False
    return stored_role(pair, cfg, plan) == "weight" and \
        small_change_reason(pair, fro, cfg, plan) is None


def process_pair(pair: KeyPair, diff: torch.Tensor, fro: float, cfg: ExtractConfig,
                 plan: PairPlan, tensors: dict[str, torch.Tensor],
                 extraction: LayerExtraction | None = None,
                 base_weight: BaseWeightFn | None = None) -> LayerReport:
    """Turn one difference into output tensors (added to ``tensors``) and its report line.

    ``extraction``: the layer's factors when the caller already extracted them (the V2
    manager's batched SVD); otherwise they are extracted here. ``base_weight``: the base
    weight, read only for DoRA output.
    """
    t0 = time.perf_counter()
    shape = pair.shape
    kind = layer_kind(shape)
    entry = LayerReport(key=pair.tuned_key, shape=list(shape), kind=kind, status=STATUS_SKIPPED,
                        change=fro)
    mapped = lora_keys_for(pair.path, cfg.key_style, plan.module_has_weight(pair.path),
                           plan.encoders)
    if mapped is None:
        entry.reason = "no difference" if fro == 0.0 else UNPATCHABLE_NOTE
        entry.seconds = time.perf_counter() - t0
        return entry
    keys, role = mapped
    unmapped = plan.comfy_unmapped.get(pair.path)
    small = small_change_reason(pair, fro, cfg, plan)
    if fro > 0.0 and _mark_noise(entry, pair, fro, plan) and cfg.skip_noise_layers:
        entry.reason = NOISE_SKIP_REASON
    elif fro == 0.0:
        entry.reason = "no difference"
    elif small is not None:
        entry.reason = small
    elif unmapped is not None and (cfg.bias_diff or role == "weight" and len(shape) >= 2):
        entry.reason = unmapped   # flagged and counted in a note: never a silently partial file
    elif role == "weight" and len(shape) >= 2:
        if cfg.lora_type == "full":
            tensors[keys.diff] = _cast_checked(diff, cfg, pair.tuned_key)
            entry.status, entry.rel_error = STATUS_DIFF, 0.0
        else:
            res = extraction or extract_layer(pair, diff, fro, cfg, base_weight)
            f = res.factors
            tensors[keys.up] = f.up
            tensors[keys.down] = f.down
            tensors[keys.alpha] = torch.tensor(f.alpha, dtype=torch.float32)
            if res.dora is not None:
                tensors[keys.dora_scale] = res.dora.scale
                entry.dora_axis = res.dora.axis
                entry.lora_same_size_rank = res.dora.lora_rank
                entry.lora_same_size_error = res.dora.lora_rel_error
            entry.status, entry.rank = STATUS_LORA, f.rank
            entry.rel_error, entry.rel_error_unclamped = res.rel_error, res.rel_error_unclamped
            entry.clamped_entries = res.clamped_entries
            entry.spectrum, entry.energy = res.spectrum, fro * fro
            stored = (f.up, f.down) + ((res.dora.scale,) if res.dora is not None else ())
            if not all(bool(torch.isfinite(t).all()) for t in stored):
                raise ExtractionInputError(
                    f"key {pair.tuned_key!r}: factors overflow {cfg.output_dtype}; "
                    "use output_dtype bf16 or fp32.")
    elif not cfg.bias_diff:
        entry.reason = "bias_diff is off (biases and non-matrix parameters not stored)"
    else:
        target = keys.diff_b if role == "bias" else keys.diff
        stored = _cast_checked(diff, cfg, pair.tuned_key)
        tensors[target] = stored
        entry.status = STATUS_DIFF
        # ``stored`` is on the CPU (the output file's tensors are), ``diff`` on the compute
        # device: compare them where the difference is, summing in float64.
        entry.rel_error = frobenius_norm(
            stored.to(device=diff.device, dtype=torch.float32) - diff) / fro
        if plan.on_nonleaf_module(pair.path):
            entry.reason = NONLEAF_NOTE
    entry.seconds = time.perf_counter() - t0
    return entry
