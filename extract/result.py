"""A finished run's result: refuse an empty one, add the notes, the size facts and the file
metadata (shared by V1, the size budget's loop and the block-swap engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .budget.report_curve import curve_from_report
from .config import ExtractConfig
from .errors import ExtractionInputError
from .keys.diffusers_keys import UNMAPPED_PREFIX, unmapped_note
from .pair_output import NONLEAF_NOTE
from .report import CHANGE_BELOW, STATUS_SKIPPED, ExtractionReport


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
