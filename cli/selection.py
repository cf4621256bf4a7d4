"""Command-line options for which layers go in: preset, patterns, change thresholds, new tensors."""

from __future__ import annotations

import argparse

from ..extract import ExtractConfig
from ..extract.new_tensors import NEW_TENSOR_MODES
from ..extract.selection import LAYER_PRESETS


def add_selection_options(p: argparse.ArgumentParser) -> None:
    d = ExtractConfig()
    p.add_argument("--layer-preset", choices=LAYER_PRESETS, default=d.layer_preset,
                   help="which layers go in: all; attention (attention projections); "
                        "attention_mlp (attention and feed-forward); no_embed_head_norm "
                        "(everything but embeddings, output heads and norms); see "
                        "docs/settings.md for the patterns")
    p.add_argument("--include", action="append", default=None, metavar="PATTERNS",
                   help="extract only parameters matching one of these patterns: globs matched "
                        "against the whole parameter path or file key (e.g. 'double_blocks.*') "
                        "or re:REGEX searched in it, separated by ';' (repeatable)")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERNS",
                   help="leave out parameters matching one of these patterns (same syntax; "
                        "repeatable); each is reported with the pattern that left it out")
    p.add_argument("--min-change", type=float, default=d.min_change_rel, metavar="REL",
                   help="leave out layers whose change ||dW||/||W|| is below REL (0: off); "
                        "with quantized inputs the absolute threshold defaults to their noise "
                        "floor")
    p.add_argument("--min-change-abs", type=float, default=d.min_change_abs, metavar="NORM",
                   help="leave out layers whose change ||dW|| (Frobenius norm) is below NORM "
                        "(0: off)")
    p.add_argument("--new-tensors", choices=NEW_TENSOR_MODES, default=d.new_tensors,
                   help="parameters only the fine-tuned model has: set_weight stores them as "
                        "ComfyUI 'set' patches (the weight is replaced whatever the strength); "
                        "skip leaves them out (both reported)")


def selection_fields(a: argparse.Namespace) -> dict[str, object]:
    """The ``ExtractConfig`` fields of these options (absent on parsers without them)."""
    if not hasattr(a, "layer_preset"):
        return {}
    return {"layer_preset": a.layer_preset, "include": ";".join(a.include or []),
            "exclude": ";".join(a.exclude or []), "min_change_rel": a.min_change,
            "min_change_abs": a.min_change_abs, "new_tensors": a.new_tensors}
