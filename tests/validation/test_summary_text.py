"""The validation summary a user reads (node UI, command line), compared line for line."""

from __future__ import annotations

from lora_extract.validation.report import (
    STATUS_COVERED,
    STATUS_NOT_MERGED,
    STATUS_SPURIOUS,
    STATUS_UNCOVERED,
    LayerValidation,
    ValidationReport,
)


def _layer(key: str, status: str, delta: float, err: float | None, rank: int | None = None,
           residual: float | None = None) -> LayerValidation:
    return LayerValidation(key=key, path=key, shape=[4, 4], kind="linear", status=status,
                           delta_norm=delta, rank=rank, rel_error=err, residual_norm=residual)


def test_summary_text_line_for_line() -> None:
    rep = ValidationReport(
        lora_name="l.safetensors", base_name="base", tuned_name="tuned", seconds=1.5,
        layers=[_layer("a", STATUS_COVERED, 2.0, 0.02, 8, 0.04),
                _layer("b", STATUS_COVERED, 1.0, 0.6, 4, 0.6),
                _layer("c", STATUS_UNCOVERED, 1.0, 1.0, None, 1.0),
                _layer("d", STATUS_NOT_MERGED, 1.0, None),
                _layer("e", STATUS_SPURIOUS, 0.0, None)],
        unmatched_keys=["x1", "x2", "x3"], text_encoder_keys=["t"], notes=["n1"])
    assert rep.format_text(unmatched=2).splitlines() == [
        "validated l.safetensors against tuned - base",
        "coverage: 2/4 changed weights patched (50.0%), 1 uncovered",
        "relative error: mean 31.00%, median 31.00%, worst 60.00% (b)",
        "whole model error: 58.08%  success rate (< 50%): 25.0%",
        "quality: excellent 1, good 0, poor 2, worse than nothing 0",
        "WARNING 3 LoRA keys match no model weight (ComfyUI: 'lora key not loaded'):",
        "  x1",
        "  x2",
        "  ... and 1 more",
        "1 text-encoder keys (not checked)",
        "WARNING 1 patches ComfyUI would not merge",
        "WARNING 1 unchanged weights changed by the LoRA",
        "note: n1",
        "worst layers:",
        "   100.00%  uncovered  rank    -  c",
        "    60.00%  covered    rank    4  b",
        "     2.00%  covered    rank    8  a",
        "time: 1.50 s",
    ]
