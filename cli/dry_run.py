"""``lora-extract extract --dry-run``: the error-against-size curve from the spectra, no file."""

from __future__ import annotations

from ..extract import ExtractConfig
from ..extract.budget.passes import chosen_point, spectra_only
from ..extract.budget.rank_math import plan_ranks
from ..extract.budget.size_text import budget_lines, curve_lines
from ..extract.budget.size_types import MIB
from ..extract.pair_output import layer_generator
from .progress import progress_bar
from .text_encoders import open_model


class _Facts:
    """What ``budget_lines`` reads, for a run that writes nothing."""

    def __init__(self, budget) -> None:
        self.budget, self.file_bytes, self.tensor_bytes = budget, 0, 0


def run_dry(base_path: str, tuned_path: str, cfg: ExtractConfig, prefetch: int,
            text_encoders: bool = False) -> int:
    """Pass 1 of a budgeted run (every layer decomposed at its cap); print the curve.

    ``text_encoders``: include a whole checkpoint's text encoders, as the extraction would."""
    spectra, plan = spectra_only(open_model(base_path, text_encoders, "base model"),
                                  open_model(tuned_path, text_encoders, "fine-tuned model"), cfg,
                                  lambda path: layer_generator(cfg, path),
                                  progress=progress_bar("spectra"), prefetch=prefetch)
    curve = spectra.curve()
    lines = [f"dry run: {len(spectra.layers)} LoRA layers, caps rank {cfg.rank}"
             f"{f' / conv {cfg.conv_rank}' if cfg.conv_rank else ''}"
             f"{f' / text encoders {cfg.text_encoder_rank}' if cfg.text_encoder_rank else ''}, "
             f"{cfg.output_dtype}; "
             f"stored diffs {spectra.fixed_bytes} bytes; no file written"]
    if plan.selection is not None:
        lines.extend(plan.selection.lines())
    if spectra.unchanged:
        lines.append(f"{spectra.unchanged} changed layer(s) below --min-change / --min-change-abs "
                     "(left out)")
    if plan.tuned_only:
        lines.append(f"{len(plan.tuned_only)} parameter(s) only in the fine-tuned model "
                     f"(new tensors: {cfg.new_tensors})")
    if cfg.target_size_mb:
        ranks = plan_ranks(spectra.layers, spectra.fixed_bytes, cfg.budget_bytes,
                           cfg.size_objective)
        curve.chosen = chosen_point(ranks)
        lines.extend(budget_lines(_Facts(ranks.outcome)))
    lines.extend(curve_lines(curve, "<- what --target-size would give (not written)"))
    top = curve.points[-1].tensor_bytes if curve.points else 0
    lines.append(f"(pick a size between {curve.points[0].tensor_bytes / MIB:.3f} and "
                 f"{top / MIB:.3f} MiB and pass it as --target-size)" if curve.points else
                 "no LoRA layers: nothing to size")
    print("\n".join(lines))
    return 0
