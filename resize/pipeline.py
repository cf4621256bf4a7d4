"""Resize a LoRA against its base model: decompose once, then apply every recipe.

1. Map LoRA layers to base weights (unmapped ones are listed and copied unresized). Layers that
   change the same base weight under different key styles (a merge of kohya and diffusers
   files) form one group and are merged into one output layer, named as the first one.
2. One pass over the layers: exact SVD of ``up @ down`` (QR path), base norms from the cache
   or computed once, ``subspace`` scales when a recipe wants them. Progress after each layer;
   ``check_interrupt`` between layers.
3. Per recipe: score, select (threshold or size), write the file atomically, report.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from ..extract.callbacks import InterruptFn, ProgressFn
from ..extract.config import OUTPUT_DTYPES
from ..extract.errors import ExtractionInputError
from ..extract.writer import save_safetensors_atomic
from .base_model import BaseModel
from .decompose import DecomposedLayer, decompose_layer, subspace_scales
from .key_map import MappedLayer, map_prefixes
from .lora_file import SET_WEIGHT_SUFFIX
from .merge import LayerContext, LoraInput
from .output import check_not_an_input, free_output_path, layer_tensors, output_file_name, output_metadata
from .recipe import Recipe
from .report import LayerResize, RecipeOutcome, ResizeReport
from .scoring import select

log = logging.getLogger(__name__)

# A layer whose largest singular value is below this is all zeros (the seed's rule): SDXL
# trainers create text-encoder layers that are never trained.
ZERO_SIGMA = 1e-6


@dataclass(frozen=True)
class ResizeOptions:
    output_dtype: str = "fp16"
    device: str = "cpu"
    overwrite: bool = False      # replace an output file of the same name
    rename_existing: bool = False  # or write the first free ``_2``, ``_3`` name (the node)
    dense_svd: bool = False      # the slow reference path (benchmarks)

    def validate(self) -> ResizeOptions:
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ExtractionInputError(
                f"output dtype {self.output_dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}.")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise ExtractionInputError(f"device {self.device!r} is not a torch device ({e}).") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ExtractionInputError(f"device {self.device!r}: CUDA is not available; use cpu.")
        return self


def _check_shapes(base: BaseModel, lora: LoraInput, mapped: list[MappedLayer]) -> None:
    bad = []
    for m in mapped:
        shapes = lora.low_rank_shape(m.prefix)
        if shapes is None:  # a dense layer: its change is checked against the base when formed
            continue
        up_shape, down_shape = shapes
        lora_shape = (up_shape[0], math.prod(down_shape))
        base_shape = base.matrix_shape(m.target)
        if lora_shape != base_shape:
            bad.append(f"{m.prefix} changes a {list(lora_shape)} weight but {m.target.ident} is "
                       f"{list(base_shape)}")
    if bad:
        raise ExtractionInputError(
            f"{lora.name} does not fit base {base.name}: {len(bad)} layers differ in shape, e.g. "
            + "; ".join(bad[:3]) + ". Pick the base model this LoRA was trained on.")


def group_by_target(mapped: list[MappedLayer]) -> list[list[MappedLayer]]:
    """Mapped layers grouped by the base weight they change, in first-seen order."""
    groups: dict[str, list[MappedLayer]] = {}
    for m in mapped:
        groups.setdefault(m.target.ident, []).append(m)
    return list(groups.values())


def decompose_all(base: BaseModel, lora: LoraInput, groups: list[list[MappedLayer]], recipes: list[Recipe],
                  opts: ResizeOptions, report: ResizeReport, progress: ProgressFn | None,
                  check_interrupt: InterruptFn | None, total_steps: int) -> list[DecomposedLayer]:
    need_spn = any(r.needs_spectral for r in recipes)
    need_sub = any(r.needs_subspace for r in recipes)
    device = torch.device(opts.device)
    layers: list[DecomposedLayer] = []
    for i, group in enumerate(groups):
        if check_interrupt is not None:
            check_interrupt()
        m = group[0]
        ctx = LayerContext(m.target.key, base.lora_shape(m.target),
                           lambda t=m.target: base.weight(t, device))
        f = lora.group_factors([g.prefix for g in group], device, ctx)
        if len(group) > 1:
            report.merged_styles[m.prefix] = [g.prefix for g in group[1:]]
        layer = decompose_layer(m.prefix, f.up, f.down, f.scale, f.output_scale, dense=opts.dense_svd)
        del f
        if layer.S.numel() == 0 or float(layer.S[0]) < ZERO_SIGMA:
            log.warning("LoRA layer %s is all zeros (dim %d); skipped", m.prefix, layer.source_rank)
            report.zero_layers.append(m.prefix)
        else:
            cached_fro, cached_spn = base.cached_norms(m.target, need_spn)
            weight = base.weight(m.target, device) if need_sub else None
            if cached_fro is None or (need_spn and cached_spn is None):
                report.norms_computed += 1
            else:
                report.norms_cached += 1
            layer.base_fro, layer.base_spn = base.norms(m.target, need_spn, device, weight)
            if weight is not None:
                layer.subspace = subspace_scales(layer, weight).cpu()
            del weight
            layer.base_key = m.target.ident
            layer.U, layer.S, layer.Vh = layer.U.cpu(), layer.S.cpu(), layer.Vh.cpu()
            layers.append(layer)
        if progress is not None:
            progress(i + 1, total_steps, m.prefix)
    if check_interrupt is not None:
        check_interrupt()
    return layers


def _unresized_tensors(lora: LoraInput, unmapped: list[str], rescale: float,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layers with no base weight and full-weight patches, copied (merge weights, rescale applied)."""
    out: dict[str, torch.Tensor] = {}
    for prefix in unmapped:
        if lora.low_rank_shape(prefix) is None:
            out.update(_dense_copied(lora, prefix, rescale, dtype))
            continue
        f = lora.factors(prefix, "cpu")
        rank = f.down.shape[0]
        out[f"{prefix}.lora_up.weight"] = (f.up * (rescale * f.scale / f.output_scale)).to(dtype)
        out[f"{prefix}.lora_down.weight"] = f.down.to(dtype)
        out[f"{prefix}.alpha"] = torch.tensor(f.output_scale * rank, dtype=torch.float32)
    for key, file, weight in lora.passthrough():
        factor = 1.0 if key.endswith(SET_WEIGHT_SUFFIX) else weight * rescale
        out[key] = (file.source.get(key, "cpu", torch.float32) * factor).to(dtype)
    return out


def _dense_copied(lora: LoraInput, prefix: str, rescale: float,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoKr/LoHa/DoRA/diff layer with no base weight: its tensors as they are, when it may be."""
    modules = lora.dense(prefix)
    weight = lora.member_weight(next(i for i, (f, _w) in enumerate(lora.members) if prefix in f.dense),
                                prefix)
    if len(modules) > 1 or weight * rescale != 1.0:
        raise ExtractionInputError(
            f"{modules[0].label} layer {prefix!r} has no weight in the base model, so it can be "
            "neither converted to LoRA nor weighted or merged. Pick the base model it was "
            "trained on, or give it weight 1 alone.")
    file = next(f for f, _w in lora.members if prefix in f.dense)
    out = {k: file.tensor(k).to(dtype) for k in modules[0].all_keys}
    if modules[0].alpha is not None:
        out[f"{prefix}.alpha"] = torch.tensor(modules[0].alpha, dtype=torch.float32)
    return out


def apply_recipe(layers: list[DecomposedLayer], recipe: Recipe, lora: LoraInput, base: BaseModel,
                 unmapped: list[str], output_folder: str, opts: ResizeOptions) -> RecipeOutcome:
    dtype = OUTPUT_DTYPES[opts.output_dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    fixed = _unresized_tensors(lora, unmapped, recipe.rescale, dtype)
    fixed_bytes = sum(t.numel() * t.element_size() for t in fixed.values() if t.dim() > 0)
    sel = select(layers, recipe, elem, fixed_bytes)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    lines: list[LayerResize] = []
    for layer, mask in zip(layers, sel.masks, strict=True):
        tensors.update(layer_tensors(layer, mask, recipe.rescale, dtype))
        k = int(mask.sum())
        ranks[layer.prefix] = k
        s = layer.S.double()
        dropped = float(torch.linalg.vector_norm(s[~mask], dtype=torch.float64))
        total = float(torch.linalg.vector_norm(s, dtype=torch.float64))
        lines.append(LayerResize(
            prefix=layer.prefix, base_key=layer.base_key, old_rank=layer.S.numel(), new_rank=k,
            rle_lora=dropped / total if total > 0 else 1.0,
            rle_ckpt=recipe.rescale * dropped / layer.base_fro if layer.base_fro else 0.0))
    tensors.update(fixed)
    if not any(k.endswith(".lora_up.weight") or k in fixed for k in tensors):
        raise ExtractionInputError(
            f"score recipe {recipe.text!r} keeps no dimension at all (threshold "
            f"{sel.threshold:.3f}); lower thr or raise size.")
    merge = [(os.path.basename(f.path), w) for f, w in lora.members] if lora.is_merge else None
    meta = output_metadata(lora.metadata, recipe, sel.threshold, ranks, lora_name=lora.name,
                           base_name=base.name, output_dtype=opts.output_dtype, merge=merge)
    path = free_output_path(output_folder, output_file_name(lora.name, recipe, sel.threshold),
                            opts.overwrite or not opts.rename_existing)
    check_not_an_input(path, [base.path, *(f.path for f, _w in lora.members)])
    if os.path.lexists(path) and not opts.overwrite:
        raise ExtractionInputError(
            f"{path} already exists; replace it (command line: --overwrite) or choose another "
            "output folder. Nothing was written.")
    size = save_safetensors_atomic(tensors, path, meta, overwrite=opts.overwrite)
    outcome = RecipeOutcome(recipe=recipe.text, threshold=sel.threshold, output_path=path,
                            file_bytes=size, kept_bytes=sel.kept_bytes + fixed_bytes,
                            rank_before=sum(lr.old_rank for lr in lines),
                            rank_after=sum(lr.new_rank for lr in lines), layers=lines,
                            quantiles=sel.quantiles)
    if log.isEnabledFor(logging.DEBUG):
        for lr in lines:
            log.debug("%s", lr.line())
    log.info("%s: selected threshold %.3f", recipe.text, sel.threshold)
    if sel.quantiles:
        log.info("Score quantiles: %s", outcome.quantile_text())
    log.info("saved %s (%d bytes)", path, size)
    return outcome


def resize_lora(base: BaseModel, lora: LoraInput, recipes: list[Recipe], output_folder: str,
                opts: ResizeOptions | None = None, *, progress: ProgressFn | None = None,
                check_interrupt: InterruptFn | None = None) -> ResizeReport:
    """Resize ``lora`` with every recipe; one output file per recipe. Returns the report."""
    opts = (opts or ResizeOptions()).validate()
    if not recipes:
        raise ExtractionInputError("no score recipe given; e.g. 'fro_ckpt=1,thr=-3.5'.")
    t0 = time.perf_counter()
    mapped, unmapped = map_prefixes(lora.prefixes, base.key_map)
    report = ResizeReport(lora=lora.name, base=base.name, layers=len(lora.prefixes),
                          unmapped=unmapped, passthrough=[k for k, _f, _w in lora.passthrough()],
                          converted={p: c for p, c in lora.converted().items() if p not in unmapped})
    if not mapped:
        raise ExtractionInputError(
            f"none of the {len(lora.prefixes)} layers of {lora.name} has a weight in base "
            f"{base.name} (e.g. {', '.join(unmapped[:3])}). Pick the base model this LoRA was "
            "trained on.")
    for p in unmapped:
        log.warning("LoRA layer %s has no weight in the base model; copied unresized", p)
    _check_shapes(base, lora, mapped)
    groups = group_by_target(mapped)
    total_steps = len(groups) + len(recipes)
    try:
        layers = decompose_all(base, lora, groups, recipes, opts, report, progress, check_interrupt,
                               total_steps)
    finally:
        # Norms computed before an interrupt or error are still right: keep them for next time.
        report.cache_path = base.cache.save() or base.cache.loaded_from
    if not layers:
        raise ExtractionInputError(f"{lora.name}: every layer is all zeros; nothing to resize.")
    os.makedirs(output_folder, exist_ok=True)
    for j, recipe in enumerate(recipes):
        if check_interrupt is not None:
            check_interrupt()
        report.outcomes.append(apply_recipe(layers, recipe, lora, base, unmapped, output_folder, opts))
        if progress is not None:
            progress(len(groups) + j + 1, total_steps, f"recipe {recipe.text}")
    report.seconds = time.perf_counter() - t0
    return report
