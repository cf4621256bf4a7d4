"""Check that Base + LoRA = fine-tuned, layer by layer.

For every weight the two models share, the LoRA is applied to the base weight in float32 by
ComfyUI's rules (:mod:`.lora_apply`) and compared with the fine-tuned weight:
``rel_error = ||W_base + dW_lora - W_tuned|| / ||W_tuned - W_base||``. 0 is perfect; 1 is what
leaving the layer out gives; above 1 the LoRA moves the layer further away than doing nothing.
One layer is compared at a time (its base, tuned, difference and patched weights), with the next
``prefetch`` layer pairs read ahead in a background thread: memory follows the largest layer.
"""

from __future__ import annotations

import math
import time

import torch

from ..extract.callbacks import InterruptFn, ProgressFn
from ..extract.decompose import randomized_svd
from ..extract.devices import checked_device
from ..extract.errors import ExtractionInputError
from ..extract.exact_svd import singular_values
from ..extract.keys.te_keys import model_path
from ..extract.layer import SPECTRUM_KEEP, layer_kind
from ..extract.norms import frobenius_norm
from ..extract.pairing import KeyPair, plan_pair
from ..extract.prefetch import Prefetcher
from ..extract.sources import WeightSource
from ..extract.waits import RunWatch
from .lora_apply import LoraIndex, PatchNotMerged, index_lora, patched_weight
from .report import (
    STATUS_COVERED,
    STATUS_NOT_MERGED,
    STATUS_SPURIOUS,
    STATUS_UNCHANGED,
    STATUS_UNCOVERED,
    LayerValidation,
    ValidationReport,
)

# How the LoRA is applied. "comfyui": as ComfyUI's LoraLoader does, which never patches a
# parameter that sits directly on a module with sub-modules (WAN blocks.N.modulation, SD3
# pos_embed): such patches count as not merged. "complete": every patch, as the pack's
# "Load LoRA (complete)" node applies it.
LOADER_COMFYUI = "comfyui"
LOADER_COMPLETE = "complete"
LOADERS = (LOADER_COMFYUI, LOADER_COMPLETE)
SKIPPED_BY_COMFYUI = ("ComfyUI's LoraLoader does not apply patches to parameters of modules with "
                      "sub-modules; load with 'Load LoRA (complete)' to apply it")

# Spectra are computed for this many of the largest covered layers (for the chart): the
# leading max(32, 4 x LoRA rank) singular values, which is the part the chart shows.
SPECTRUM_LAYERS = 4
SPECTRUM_MIN_VALUES = 32
EXACT_SPECTRUM_SIDE = 1536


def _spectrum_keys(pairs: list[KeyPair], index: LoraIndex, n: int) -> set[str]:
    matrices = [p for p in pairs if len(p.shape) >= 2 and p.path in index.patches]
    matrices.sort(key=lambda p: (-math.prod(p.shape), p.path))
    return {p.path for p in matrices[:n]}


def leading_singular_values(mat: torch.Tensor, k: int) -> list[float]:
    """The top ``k`` singular values of ``mat``, for the chart.

    Up to EXACT_SPECTRUM_SIDE on the smaller side the exact spectrum (Gram eigenvalues) costs
    about as much as a sketch; above it the Gram eigen-solve grows with the cube of the side, so a
    randomized range finder with 4 power iterations (fixed seed: the same chart every run) takes
    over: top 16 values within 1e-3, the rest of the head within ~6% (measured on 1280-wide layers).
    """
    k = min(k, SPECTRUM_KEEP, *mat.shape)
    if min(mat.shape) <= EXACT_SPECTRUM_SIDE or 2 * (k + 16) >= min(mat.shape):
        return [float(v) for v in singular_values(mat)[:k]]
    res = randomized_svd(mat, k, oversample=16, niter=4, generator=torch.Generator().manual_seed(0))
    return [float(v) for v in res.S[:k]]


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _raise_not_finite(tensors: list[tuple[torch.Tensor, str]]) -> None:
    # Only reached when a norm came out NaN/Inf: then find which input holds the bad values.
    for t, what in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ExtractionInputError(
                f"{what} contains NaN or Inf values; the file is broken. Re-download or re-save it.")
    raise ExtractionInputError(f"{tensors[0][1]}: the difference overflows float32; the models "
                               "are not a base/fine-tune pair.")


def load_pair(pair: KeyPair, base: WeightSource, tuned: WeightSource,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, fine-tuned weight) of one key, float32 on ``device``."""
    return base.get(pair.base_key, device, torch.float32), tuned.get(pair.tuned_key, device, torch.float32)


def validate_layer(pair: KeyPair, base: WeightSource, tuned: WeightSource, lora: WeightSource,
                   index: LoraIndex, *, device: str | torch.device = "cpu",
                   want_spectrum: bool = False,
                   weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                   loader_skips: bool = False) -> LayerValidation:
    """Apply the LoRA to one base weight and compare it with the fine-tuned weight.

    ``weights``: the pair already loaded (by the prefetcher); read here otherwise.
    ``loader_skips``: the chosen loader never applies a patch on this parameter (a valid patch
    is then reported as not merged; a broken one still as broken).
    """
    base_w, tuned_w = weights if weights is not None else load_pair(pair, base, tuned, device)
    diff = tuned_w - base_w
    delta_norm = frobenius_norm(diff)
    if not _finite(delta_norm):  # NaN/Inf in either input propagates into the norm
        _raise_not_finite([(tuned_w, f"key {pair.tuned_key!r} in {tuned.name}"),
                           (base_w, f"key {pair.base_key!r} in {base.name}")])
    entry = LayerValidation(key=pair.tuned_key, path=pair.path, shape=list(pair.shape),
                            kind=layer_kind(pair.shape), status=STATUS_UNCHANGED,
                            delta_norm=delta_norm, rank=index.rank(lora, pair.path))
    patch = index.patches.get(pair.path)
    if patch is not None:
        try:
            patched = patched_weight(base_w, patch, lora)
        except PatchNotMerged as e:
            entry.status, entry.note = STATUS_NOT_MERGED, str(e)
            entry.rel_error = 1.0 if delta_norm > 0 else None
            return entry
        if tuple(patched.shape) != tuple(tuned_w.shape):
            # reshape_weight grew the weight: ComfyUI would not load such a model either.
            entry.status = STATUS_NOT_MERGED
            entry.note = f"patched shape {list(patched.shape)} != model shape {list(tuned_w.shape)}"
            entry.rel_error = 1.0 if delta_norm > 0 else None
            return entry
        if loader_skips:
            entry.status, entry.note = STATUS_NOT_MERGED, SKIPPED_BY_COMFYUI
            entry.rel_error = 1.0 if delta_norm > 0 else None
            return entry
        residual = frobenius_norm(patched.sub_(tuned_w))
        if not _finite(residual):
            raise ExtractionInputError(
                f"{lora.name}: the patch for {pair.path!r} has NaN or Inf values (or overflows "
                "float32); the LoRA file is broken. Re-extract or re-download it.")
        entry.residual_norm = residual
        if delta_norm > 0:
            entry.status, entry.rel_error = STATUS_COVERED, residual / delta_norm
        elif residual > 0:
            # The fine-tune left this weight alone but the LoRA changes it.
            entry.status = STATUS_SPURIOUS
            entry.note = f"changes an unchanged weight by {residual:.4g} (norm)"
        del patched
    elif delta_norm > 0:
        entry.status, entry.rel_error, entry.residual_norm = STATUS_UNCOVERED, 1.0, delta_norm
    if want_spectrum and delta_norm > 0 and diff.dim() >= 2:
        entry.spectrum = leading_singular_values(diff.reshape(diff.shape[0], -1),
                                                 max(SPECTRUM_MIN_VALUES, 4 * (entry.rank or 8)))
    return entry


def validate_lora(base: WeightSource, tuned: WeightSource, lora: WeightSource, *,
                  device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                  check_interrupt: InterruptFn | None = None,
                  spectrum_layers: int = SPECTRUM_LAYERS, prefetch: int = 2,
                  loader: str = LOADER_COMPLETE) -> ValidationReport:
    """Validate ``lora`` against the pair (``base``, ``tuned``), one layer at a time.

    The next ``prefetch`` layer pairs are read in a background thread while one is compared.
    ``loader``: score the LoRA as ComfyUI's LoraLoader applies it (``comfyui``) or as "Load
    LoRA (complete)" does (``complete``).
    """
    if loader not in LOADERS:
        raise ExtractionInputError(f"loader {loader!r} is not one of {', '.join(LOADERS)}; pick one of them.")
    t0 = time.perf_counter()
    checked_device(device)
    lora_keys = lora.keys()
    if not lora_keys:
        raise ExtractionInputError(f"{lora.name}: the LoRA file has no tensors. Check the file.")
    plan = plan_pair(base, tuned)
    model_paths = [p for p in (model_path(k) for k in base.keys()) if p is not None]
    index = index_lora(lora_keys, model_paths)
    report = ValidationReport(lora_name=lora.name, base_name=base.name, tuned_name=tuned.name,
                              unmatched_keys=index.unmatched, text_encoder_keys=index.text_encoder,
                              key_styles=index.key_styles)
    if not index.patches:
        report.notes.append(
            f"no key of {lora.name} matches a weight of {base.name}: wrong base model, or a key "
            "style this check does not know (diffusers / architecture-specific names).")
    paths = {p.path for p in plan.common}
    for target in sorted(set(index.patches) - paths):
        report.notes.append(f"LoRA patches {target!r}, which is not in both models; not checked")
    want = _spectrum_keys(plan.common, index, spectrum_layers)
    total = len(plan.common)
    def load(pair: KeyPair) -> tuple[torch.Tensor, torch.Tensor]:
        return load_pair(pair, base, tuned, device)

    for i, (pair, weights) in enumerate(Prefetcher(
            plan.common, load, prefetch, watch=RunWatch(check_interrupt),
            what="the next layer pair from the reader",
            cpu_compute=torch.device(device).type == "cpu")):
        if check_interrupt is not None:
            check_interrupt()
        skips = loader == LOADER_COMFYUI and plan.on_nonleaf_module(pair.path)
        report.layers.append(validate_layer(pair, base, tuned, lora, index, device=device,
                                            want_spectrum=pair.path in want, weights=weights,
                                            loader_skips=skips))
        del weights
        if progress is not None:
            progress(i + 1, total, pair.tuned_key)
    if check_interrupt is not None:
        check_interrupt()
    if any(p.dora is not None for p in index.patches.values()):
        report.notes.append("DoRA patches are not applied by this check (reported as not merged)")
    skipped = [r for r in report.layers if r.note == SKIPPED_BY_COMFYUI]
    if skipped:
        report.notes.append(
            f"{len(skipped)} patch(es) such as {skipped[0].key!r} are scored as ComfyUI's LoraLoader "
            "applies them (not at all); 'Load LoRA (complete)' applies them (loader: complete).")
    report.seconds = time.perf_counter() - t0
    return report
