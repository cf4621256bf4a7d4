"""Whole-model extraction: stream key pairs, extract each layer, collect tensors and the report."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .budget.report_curve import curve_from_report
from .change_threshold import small_change_reason
from .config import ExtractConfig
from .dora import extract_dora_matrix
from .errors import ExtractionInputError
from .keys.diffusers_keys import UNMAPPED_PREFIX, resolve_for_plan, unmapped_note
from .keys.te_keys import UNPATCHABLE_NOTE, layer_config, lora_keys_for
from .layer import LayerExtraction, extract_matrix, layer_kind
from .new_tensors import store_new_tensors
from .norms import frobenius_norm
from .oom_fallback import OomFallback
from .pairing import KeyPair, PairPlan, load_difference
from .plan_options import plan_for
from .prefetch import Prefetcher
from .report import (
    CHANGE_BELOW,
    STATUS_DIFF,
    STATUS_LORA,
    STATUS_SKIPPED,
    ExtractionReport,
    LayerReport,
)
from .source_info import NOISE_FLAG_FACTOR
from .sources import WeightSource
from .waits import RunWatch
from .writer import save_safetensors_atomic

log = logging.getLogger(__name__)

# progress(done, total, key) after each layer; check_interrupt() raises to stop between layers.
ProgressFn = Callable[[int, int, str], None]
InterruptFn = Callable[[], None]
# base_weight(device): the layer's base weight in float32 on ``device`` (DoRA output needs it).
BaseWeightFn = Callable[[torch.device], torch.Tensor]


# Measured against ComfyUI 0.3.64 and the 2026-08 code: its loader accepts these keys without a
# warning but only patches parameters of leaf modules. Say so instead of letting it pass silently.
NONLEAF_NOTE = ("stored as .diff, but ComfyUI's loader does not apply diffs to parameters of "
                "modules that have sub-modules (it ignores them silently); load the LoRA with "
                "'Load LoRA (complete)' to apply them")


class NothingToExtract(ExtractionInputError):
    """No parameter differs between the two models; nothing was written."""

    def __init__(self, message: str, report: ExtractionReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExtractionResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    report: ExtractionReport | None = None


def _layer_generator(cfg: ExtractConfig, key: str) -> torch.Generator:
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
    gen = _layer_generator(cfg, pair.path)
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


def extract_lora(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                 progress: ProgressFn | None = None, check_interrupt: InterruptFn | None = None,
                 prefetch: int = 2) -> ExtractionResult:
    """Extract a LoRA from ``tuned - base``; returns tensors, metadata and the report.

    Raises :class:`ExtractionInputError` for bad input (before any heavy work where possible)
    and :class:`NothingToExtract` when the models are identical.
    """
    cfg.validate()
    if cfg.target_size_mb:
        # Imported here: the budgeted pipeline builds on this module.
        from .budget.loop import extract_lora_budgeted
        return extract_lora_budgeted(base, tuned, cfg, progress=progress,
                                     check_interrupt=check_interrupt, prefetch=prefetch)
    t0 = time.perf_counter()
    plan = plan_for(base, tuned, cfg)
    cfg, style_notes = resolve_for_plan(cfg, plan)
    report = new_report(cfg, plan, style_notes)
    tensors: dict[str, torch.Tensor] = {}
    total = len(plan.common)

    # Accelerator OOM on a layer: that layer is redone on the CPU (noted in the report).
    fallback = OomFallback(cfg.device)

    def load(pair: KeyPair) -> tuple[torch.Tensor, float]:
        return fallback.call(pair.tuned_key, lambda dev: load_difference(
            base, tuned, pair.tuned_key, pair.base_key, dev))

    def process(pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        loaded_on = "cpu" if fallback.ran_on_cpu(pair.tuned_key) else fallback.requested

        def base_weight(dev: torch.device) -> torch.Tensor:
            return base.get(pair.base_key, dev, torch.float32)

        def work(dev: str) -> LayerReport:
            if dev == loaded_on:
                return process_pair(pair, diff, fro, cfg, plan, tensors, base_weight=base_weight)
            # A retry: the failed attempt consumed the difference in place, so read it again.
            d, f = load_difference(base, tuned, pair.tuned_key, pair.base_key, dev)
            return process_pair(pair, d, f, cfg, plan, tensors, base_weight=base_weight)
        return fallback.call(pair.tuned_key, work, loaded_on)

    run_layers(plan.common, load, process, report, prefetch=prefetch, progress=progress,
               check_interrupt=check_interrupt, total=total)
    report.notes.extend(fallback.notes())
    store_new_tensors(plan, base, tuned, cfg, tensors, report)
    report.seconds = time.perf_counter() - t0
    return finish_result(cfg, report, tensors)


def new_report(cfg: ExtractConfig, plan: PairPlan, notes: list[str]) -> ExtractionReport:
    """A run's report before any layer: the config, the notes, and every key left out of the
    pairing with its reason (nothing is dropped silently)."""
    report = ExtractionReport(config=cfg.to_dict(), notes=list(notes), inputs=list(plan.inputs))
    if plan.selection is not None:
        report.notes.extend(plan.selection.note_lines())
    for key, shape, reason in plan.left_out:
        report.add(LayerReport(key=key, shape=list(shape), kind=layer_kind(shape),
                               status=STATUS_SKIPPED, reason=reason))
    return report


def run_layers(pairs: list[KeyPair], load: Callable[[KeyPair], tuple[torch.Tensor, float]],
               process: Callable[[KeyPair, torch.Tensor, float], LayerReport],
               report: ExtractionReport, *, prefetch: int, progress: ProgressFn | None,
               check_interrupt: InterruptFn | None, total: int) -> None:
    """The V1 layer loop: read ahead, check the interrupt between layers, process each
    difference into the report, report progress; the difference is dropped before the next."""
    layers = Prefetcher(pairs, load, prefetch, watch=RunWatch(check_interrupt),
                        what="the next layer from the reader")
    for i, (pair, (diff, fro)) in enumerate(layers):
        if check_interrupt is not None:
            check_interrupt()
        report.add(process(pair, diff, fro))
        del diff
        if progress is not None:
            progress(i + 1, total, pair.tuned_key)
    if check_interrupt is not None:
        check_interrupt()


def finish_result(cfg: ExtractConfig, report: ExtractionReport,
                  tensors: dict[str, torch.Tensor]) -> ExtractionResult:
    """Refuse an empty result, add notes and file metadata (shared by V1 and the V2 manager)."""
    if not tensors:
        # Parameters that differ but were not stored (bias_diff off): the models are not identical.
        differs = [r for r in report.layers if r.status != STATUS_SKIPPED
                   or r.reason.startswith(("bias_diff is off", CHANGE_BELOW))]
        fix = ("lower min_change_rel / min_change_abs" if differs and
               differs[0].reason.startswith(CHANGE_BELOW) else "turn bias_diff on")
        msg = ("the two models are identical: no parameter differs, so there is nothing to "
               "extract and no file was written." if not differs else
               f"{len(differs)} parameter(s) differ (e.g. {differs[0].key!r}) but none could be "
               f"stored: {differs[0].reason}. No file was written; {fix} to store them.")
        raise NothingToExtract(msg, report)
    ignored = [r.key for r in report.layers if r.reason == NONLEAF_NOTE]
    if ignored:
        report.notes.append(
            f"{len(ignored)} parameter difference(s) such as {ignored[0]!r} are stored, but "
            "ComfyUI's LoRA loader ignores parameters of non-leaf modules; load the LoRA with this "
            "pack's 'Load LoRA (complete)' node to apply them (other loaders apply them too).")
    if cfg.dora != "off" and cfg.key_style == "diffusers":
        report.notes.append(
            "DoRA magnitudes are stored as '<prefix>.dora_scale', the name ComfyUI's loader reads "
            "in every key style; PEFT and diffusers name theirs 'lora_magnitude_vector' and "
            "normalise by another norm, so this file is for ComfyUI.")
    _add_size_facts(cfg, report, tensors)
    unmapped = [r.key for r in report.layers if r.reason.startswith(UNMAPPED_PREFIX)]
    if unmapped:
        report.notes.append(unmapped_note(unmapped))
    metadata = cfg.metadata()
    metadata.update(_network_metadata(cfg, report))
    return ExtractionResult(tensors=tensors, metadata=metadata, report=report)


def _add_size_facts(cfg: ExtractConfig, report: ExtractionReport,
                    tensors: dict[str, torch.Tensor]) -> None:
    """The stored tensors' bytes, and the error-against-size curve unless a budget run set it."""
    report.tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if report.size_curve is None:
        report.size_curve = curve_from_report(report, cfg)


def _network_metadata(cfg: ExtractConfig, report: ExtractionReport) -> dict[str, str]:
    """kohya-compatible ``ss_*`` fields (trainers and UIs read them) plus our format version."""
    import json

    s = report.summary()
    dim = s.rank_max if s.rank_max is not None else cfg.rank
    meta = {"lora_extract.format": "1", "lora_extract.key_style": cfg.key_style}
    if cfg.key_style == "kohya":
        alpha = cfg.alpha if cfg.alpha > 0 else dim
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(dim),
            "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps({
                "conv_dim": str(cfg.conv_rank or cfg.rank),
                "conv_alpha": f"{(cfg.alpha if cfg.alpha > 0 else (cfg.conv_rank or cfg.rank)):g}",
                "algo": "lora", "extracted_by": "lora_extract",
            }),
        })
    return meta


def extract_to_file(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, path: str, *,
                    progress: ProgressFn | None = None, check_interrupt: InterruptFn | None = None,
                    prefetch: int = 2, overwrite: bool = False) -> ExtractionReport:
    """Extract and write the LoRA atomically to ``path``; returns the report."""
    result = extract_lora(base, tuned, cfg, progress=progress, check_interrupt=check_interrupt,
                          prefetch=prefetch)
    report = result.report
    assert report is not None
    t0 = time.perf_counter()
    report.file_bytes = save_safetensors_atomic(result.tensors, path, result.metadata,
                                                overwrite=overwrite)
    report.output_path = path
    report.seconds += time.perf_counter() - t0
    log.info("saved %s (%d bytes)", path, report.file_bytes)
    return report
