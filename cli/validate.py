"""``lora-extract validate BASE TUNED LORA``: does BASE + LORA reproduce TUNED, layer by layer?

Prints the summary (coverage, errors, quality bands, worst layers); ``--report`` writes every
layer as JSON, ``--chart`` the report chart as PNG. Exit status 0 when the check ran (whatever
the quality), 2 on bad input, 130 on Ctrl-C, as the other commands; ``--max-error`` turns a
whole-model error above the limit, or any uncovered / unmatched key, into exit status 1 for
scripts and CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..extract import open_source
from ..extract.tempfiles import replaced_atomically, write_text_atomic
from ..validation.validate import LOADER_COMPLETE, LOADERS, validate_lora
from .help_format import DefaultsHelpFormatter
from .output_checks import check_distinct, check_output_file
from .progress import progress_bar
from .text_encoders import lora_has_text_encoder, open_model

log = logging.getLogger("lora_extract")


def _save_chart_atomic(img, path: str) -> None:
    with replaced_atomically(path, ".png.part") as fd, os.fdopen(fd, "wb") as f:
        img.save(f, format="PNG")


def cmd_validate(a: argparse.Namespace) -> int:
    inputs = (("base model", a.base), ("fine-tuned model", a.tuned), ("LoRA", a.lora))
    outputs = (("--report", a.report), ("--chart", a.chart))
    check_distinct(outputs)
    for flag, path in outputs:
        if path:
            check_output_file(path, flag, overwrite=a.overwrite, inputs=inputs)
    lora = open_source(a.lora)
    # Text encoders of whole checkpoints are compared when the LoRA has keys for them.
    te = lora_has_text_encoder(lora.keys())
    base = open_model(a.base, te, "base model")
    tuned = open_model(a.tuned, te, "fine-tuned model")
    report = validate_lora(base, tuned, lora, device=a.device, progress=progress_bar("validate"),
                           spectrum_layers=0 if a.chart is None else 4, loader=a.loader)
    for path in (a.report, a.chart):
        if path:   # checked before the work; created only now, so a failed run leaves nothing
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if a.report:
        write_text_atomic(a.report, report.to_json())
    if a.chart:
        from ..charts import validation_chart

        _save_chart_atomic(validation_chart(report), a.chart)
    print(report.format_text())
    if a.max_error is not None:
        s = report.summary()
        failed = ((s.overall_error or 0.0) > a.max_error or s.uncovered > 0 or s.unmatched_keys > 0
                  or s.not_merged > 0)
        if failed:
            print(json.dumps({"failed": True, "overall_error": s.overall_error,
                              "uncovered": s.uncovered, "unmatched_keys": s.unmatched_keys,
                              "not_merged": s.not_merged}), file=sys.stderr)
            return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``validate`` on the ``lora-extract`` command line."""
    p = subparsers.add_parser("validate", help="check that BASE + LORA reproduces TUNED, per layer",
                              description=__doc__.split("\n\n", 1)[1].strip(),
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("base", help="the original model (.safetensors, or .ckpt loaded safely)")
    p.add_argument("tuned", help="the fine-tuned model")
    p.add_argument("lora", help="the LoRA file to check (comfy or kohya keys)")
    p.add_argument("--report", metavar="JSON", help="write the per-layer validation as JSON here")
    p.add_argument("--chart", metavar="PNG", help="write the report chart (PNG) here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --report / --chart file (never one of the inputs)")
    p.add_argument("--device", default="cpu", help="where to apply the LoRA (cpu, cuda)")
    p.add_argument("--loader", choices=LOADERS, default=LOADER_COMPLETE,
                   help="score the LoRA as ComfyUI's LoraLoader applies it (comfyui: patches on "
                        "parameters of modules with sub-modules are not applied) or as the pack's "
                        "'Load LoRA (complete)' node does (complete)")
    p.add_argument("--max-error", type=float, default=None, metavar="FRACTION",
                   help="exit 1 if the whole-model relative error exceeds this (e.g. 0.2), or if "
                        "any changed weight is uncovered or any LoRA key matches nothing")
    p.set_defaults(func=cmd_validate)
    return p
