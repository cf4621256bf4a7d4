"""Parameters only the fine-tuned model has, stored as ComfyUI ``set_weight`` patches.

ComfyUI's LoRA loader (``comfy.lora.load_lora``; ComfyUI 0.3.64 and 2026-08 alike, present since
November 2024) reads ``<prefix>.set_weight`` for every prefix its key map knows and patches the
weight with ``("set", (tensor,))``: ``calculate_weight`` copies the tensor into the weight
(``weight.copy_``). So:

- the keys: a diffusion-model ``X.weight`` under ``diffusion_model.X.set_weight``, any other
  diffusion-model parameter ``X`` under ``diffusion_model.X.set_weight`` (the generic names
  ``model_lora_keys_unet`` maps for every model), a text-encoder ``X.weight`` under
  ``text_encoders.X.set_weight`` (``model_lora_keys_clip`` maps only ``.weight`` keys, so a text
  encoder's other parameters cannot be set);
- the value replaces the weight whatever the LoRA's strength (a "set" patch ignores it);
- it applies only where the model being patched has a parameter of that name and shape: a
  base checkpoint that merely lacks the tensor (ComfyUI builds the parameter from the
  architecture). A model without such a parameter (a layer the fine-tune added) makes ComfyUI
  log "lora key not loaded" for the key and ignore it; the rest of the LoRA still applies;
- ComfyUI patches only parameters of leaf modules, so a parameter that sits on a module with
  sub-modules is left out.

A difference against zeros (``.diff``) is not used: ComfyUI would add it to whatever the model
holds there (uninitialised memory for a parameter its checkpoint lacked).
"""

from __future__ import annotations

import torch

from .config import ExtractConfig
from .errors import ExtractionInputError
from .keys.te_keys import is_te_key
from .layer import layer_kind
from .norms import frobenius_norm
from .pairing import KeyPair, PairPlan
from .report import STATUS_DIFF, STATUS_SKIPPED, ExtractionReport, LayerReport
from .sources import WeightSource

SET_NOTE = ("only in the fine-tuned model: stored as {key} (ComfyUI sets the weight to it "
            "whatever the strength, where the model it patches has this parameter)")
SKIP_OPTION = "only in the fine-tuned model (new_tensors is skip)"
NO_PARAMETER = ("only in the fine-tuned model, and the base model has no parameter of this name: "
                "ComfyUI's loader would have nowhere to put it ('lora key not loaded'); not stored")
TE_NOT_WEIGHT = ("only in the fine-tuned model: ComfyUI's loader sets only .weight parameters of "
                 "a text encoder; not stored")
DIFFUSERS_NAMES = ("only in the fine-tuned model: a diffusers-named parameter, which ComfyUI's "
                   "loader cannot set (it maps set_weight only under its own names); not stored")
NONLEAF = ("only in the fine-tuned model, on a module with sub-modules: ComfyUI's loader never "
           "patches such parameters; not stored")


def set_weight_key(path: str) -> str | None:
    """The key ComfyUI's loader reads as a set patch for this parameter path, or None."""
    if is_te_key(path):
        return path[: -len(".weight")] + ".set_weight" if path.endswith(".weight") else None
    module = path[: -len(".weight")] if path.endswith(".weight") else path
    return "diffusion_model." + module + ".set_weight"


def lists_every_parameter(source: WeightSource) -> bool:
    """Whether a source's keys are all the parameters of the model ComfyUI patches (a ComfyUI
    MODEL or CLIP): then a key it lacks is a parameter that model does not have."""
    return bool(getattr(source, "lists_every_parameter", False))


def unstorable_reason(pair: KeyPair, cfg: ExtractConfig, plan: PairPlan,
                      base: WeightSource) -> str | None:
    """Why a fine-tune-only parameter cannot be stored as a set patch, or None."""
    if lists_every_parameter(base):
        return NO_PARAMETER
    if set_weight_key(pair.path) is None:
        return TE_NOT_WEIGHT
    if cfg.key_style == "diffusers":
        return DIFFUSERS_NAMES
    if plan.on_nonleaf_module(pair.path):
        return NONLEAF
    return None


def new_tensor_bytes(plan: PairPlan, cfg: ExtractConfig, base: WeightSource) -> int:
    """Bytes the stored set patches take (a size budget counts them as fixed)."""
    if cfg.new_tensors != "set_weight":
        return 0
    itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
    total = 0
    for pair in plan.tuned_only:
        if unstorable_reason(pair, cfg, plan, base) is None:
            n = 1
            for s in pair.shape:
                n *= s
            total += n * itemsize
    return total


def store_new_tensors(plan: PairPlan, base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                      tensors: dict[str, torch.Tensor], report: ExtractionReport) -> None:
    """Add each fine-tune-only parameter of ``plan.tuned_only`` to ``tensors`` as a set patch, or
    to the report as left out with the reason; one report entry each."""
    for pair in plan.tuned_only:
        entry = LayerReport(key=pair.tuned_key, shape=list(pair.shape),
                            kind=layer_kind(pair.shape), status=STATUS_SKIPPED)
        reason = SKIP_OPTION if cfg.new_tensors != "set_weight" else \
            unstorable_reason(pair, cfg, plan, base)
        if reason is not None:
            entry.reason = reason
            report.add(entry)
            continue
        key = set_weight_key(pair.path)
        assert key is not None
        value = tuned.get(pair.tuned_key, "cpu", torch.float32)
        stored = value.to(cfg.torch_dtype).contiguous()
        if not bool(torch.isfinite(stored).all()):
            raise ExtractionInputError(
                f"key {pair.tuned_key!r}: values overflow {cfg.output_dtype} (or the model holds "
                "NaN/Inf); use output_dtype bf16 or fp32.")
        tensors[key] = stored
        norm = frobenius_norm(value)
        entry.status = STATUS_DIFF
        entry.reason = SET_NOTE.format(key=key)
        entry.rel_error = frobenius_norm(stored.float() - value) / norm if norm > 0 else 0.0
        report.add(entry)
    stored_n = sum(r.reason.startswith("only in the fine-tuned model: stored as")
                   for r in report.layers)
    if stored_n:
        report.notes.append(
            f"{stored_n} parameter(s) only in the fine-tuned model are stored as set_weight: "
            "ComfyUI's loader replaces those weights whatever the LoRA strength, where the model "
            "it patches has them (a base file that lacked the tensor); a model without such a "
            "parameter logs 'lora key not loaded' for it and ignores it.")

