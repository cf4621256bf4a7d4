"""``lora-extract``: the extraction core on the command line, without ComfyUI.

Exit status: 0 success, 2 bad input (one line on stderr says why; no output file),
130 interrupted (Ctrl-C; no output file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from ..extract import (
    ALGORITHMS,
    LORA_TYPES,
    OUTPUT_DTYPES,
    ExtractConfig,
    ExtractionInputError,
    extract_to_file,
)
from ..extract.budget import SIZE_OBJECTIVES
from ..extract.config import DORA_OPTIONS
from ..extract.devices import resolve_device
from ..extract.errors import ExtractionStalled
from ..extract.keys import KEY_STYLES
from ..extract.tempfiles import write_text_atomic
from ..extract.waits import DEFAULT_STALL_S, STALL_ENV
from .dry_run import run_dry
from .extract_v2 import add_device_option, add_v2_options, memory_options, run_extract_v2, wants_v2
from .flag_names import with_flag_names
from .help_format import DefaultsHelpFormatter
from .merge import add_parser as add_merge_parser
from .output_checks import check_distinct, check_output_file, check_output_folder
from .progress import progress_bar
from .resize import add_parser as add_resize_parser
from .selection import add_selection_options, selection_fields
from .text_encoders import add_text_encoder_options, open_model
from .validate import add_parser as add_validate_parser

log = logging.getLogger("lora_extract")


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    d = ExtractConfig()
    p.add_argument("--rank", type=int, default=d.rank, metavar="N",
                   help="rank of every LoRA layer; the cap with an adaptive --lora-type or "
                        "--target-size")
    p.add_argument("--conv-rank", type=int, default=d.conv_rank, metavar="N",
                   help="rank (cap) of conv layers (0: same as --rank)")
    p.add_argument("--lora-type", choices=LORA_TYPES, default=d.lora_type,
                   help="standard: fixed rank; adaptive_*: rank per layer from its spectrum "
                        "(--adaptive-param); full: store whole differences")
    p.add_argument("--adaptive-param", type=float, default=d.adaptive_param, metavar="X",
                   help="parameter of the adaptive rank rule, 0..1")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=d.algorithm,
                   help="svd_linalg: exact SVD; svd_lowrank: randomized, faster on large layers")
    p.add_argument("--lowrank-iters", type=int, default=d.lowrank_iters, metavar="N",
                   help="power iterations of svd_lowrank (1..100)")
    p.add_argument("--dtype", choices=tuple(OUTPUT_DTYPES), default=d.output_dtype,
                   help="data type of the saved factors")
    p.add_argument("--no-bias-diff", action="store_true", help="do not store bias / 1-D differences")
    p.add_argument("--clamp-quantile", type=float, default=d.clamp_quantile, metavar="Q",
                   help="q of the outlier clamp: in each rank component, entries of up and down "
                        "beyond 2x the q quantile of their own vector are clipped")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp factor outliers")
    p.add_argument("--alpha", type=float, default=d.alpha, metavar="A",
                   help="LoRA alpha stored in the file (0: equal to each layer's rank, scale 1)")
    p.add_argument("--key-style", choices=KEY_STYLES, default=d.key_style,
                   help="key names written; auto: diffusers for a diffusers-named model, else comfy")
    add_device_option(p)
    p.add_argument("--report", metavar="JSON", help="write the per-layer report as JSON here")
    p.add_argument("--prefetch", type=int, default=2, metavar="N",
                   help="layers read ahead in the background (V1 engine)")
    p.add_argument("--target-size", type=float, default=d.target_size_mb, metavar="MIB",
                   help="allocate ranks (capped by --rank/--conv-rank) for the least error whose "
                        "tensors fit this many MiB (0: off, fixed ranks; the safetensors header "
                        "comes on top)")
    p.add_argument("--size-objective", choices=SIZE_OBJECTIVES, default=d.size_objective,
                   help="with --target-size: mean = the least average layer error; worst = the "
                        "least worst-layer error (no layer left far behind)")
    p.add_argument("--dora", choices=DORA_OPTIONS, default=d.dora,
                   help="off: plain LoRA; output / input: DoRA, a LoRA plus a float32 magnitude "
                        "per output or input channel (dora_scale, read by ComfyUI's loader); the "
                        "report compares each layer with plain LoRA in the same bytes")
    p.add_argument("--skip-noise-layers", action="store_true",
                   help="quantized inputs: leave out layers whose difference is at the "
                        "estimated rounding-noise level (docs/model-formats.md)")
    add_selection_options(p)
    add_v2_options(p)


def _config(a: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(
        rank=a.rank, conv_rank=a.conv_rank, lora_type=a.lora_type,
        adaptive_param=a.adaptive_param, algorithm=a.algorithm, lowrank_iters=a.lowrank_iters,
        output_dtype=a.dtype, bias_diff=not a.no_bias_diff,
        clamp_quantile=None if a.no_clamp else a.clamp_quantile, alpha=a.alpha,
        key_style=a.key_style, device=resolve_device(a.device),
        target_size_mb=a.target_size, size_objective=a.size_objective,
        text_encoder_rank=getattr(a, "text_encoder_rank", 0), dora=a.dora,
        skip_noise_layers=a.skip_noise_layers, **selection_fields(a)).validate()


def run_extract(base_path: str, tuned_path: str, out: str, cfg: ExtractConfig,
                report_path: str | None, prefetch: int, overwrite: bool = False,
                text_encoders: bool = False, args: argparse.Namespace | None = None) -> int:
    if args is not None and wants_v2(args):
        return run_extract_v2(base_path, tuned_path, out, cfg, memory_options(args), report_path,
                              overwrite, text_encoders=text_encoders)
    base = open_model(base_path, text_encoders, "base model")
    tuned = open_model(tuned_path, text_encoders, "fine-tuned model")
    report = extract_to_file(base, tuned, cfg, out, progress=progress_bar("extract"),
                             prefetch=prefetch, overwrite=overwrite)
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        write_text_atomic(report_path, report.to_json())
    print(report.format_text())
    return 0


def _check_outputs(a: argparse.Namespace) -> None:
    """Every file ``extract`` writes, checked before any work (``output_checks``)."""
    inputs = (("base model", a.base), ("fine-tuned model", a.tuned))
    outputs = (("-o", a.output), ("--report", a.report))
    check_distinct(outputs)
    for flag, path in outputs:
        if path:
            check_output_file(path, flag, overwrite=a.overwrite, inputs=inputs)


def cmd_extract(a: argparse.Namespace) -> int:
    if a.dry_run and (a.output or a.report):
        flag = "-o" if a.output else "--report"
        raise ExtractionInputError(f"{flag} and --dry-run do not go together: a dry run writes "
                                   "no file. Drop one of them.")
    if not a.dry_run and not a.output:
        raise ExtractionInputError("no output file: pass -o OUT.safetensors (or --dry-run).")
    cfg = _config(a)
    _check_outputs(a)
    if a.dry_run:
        return run_dry(a.base, a.tuned, cfg, a.prefetch, text_encoders=not a.no_text_encoder)
    return run_extract(a.base, a.tuned, a.output, cfg, a.report, a.prefetch, a.overwrite,
                       text_encoders=not a.no_text_encoder, args=a)


def cmd_demo(a: argparse.Namespace) -> int:
    from ..extract.synthetic import demo_layers, write_pair

    if a.dir:
        check_output_folder(a.dir, "--dir")
        os.makedirs(a.dir, exist_ok=True)
    folder = a.dir or tempfile.mkdtemp(prefix="lora-extract-demo-")
    base, tuned = write_pair(folder, demo_layers(), seed=0)
    out = os.path.join(folder, "demo_lora.safetensors")
    print(f"demo pair: {base} and {tuned}")
    return run_extract(base, tuned, out, _config(a), a.report, a.prefetch, overwrite=True, args=a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-extract", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines (-v: info, -vv: debug)")
    parser.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop with an error when no layer completes for this long "
                             f"(default: {DEFAULT_STALL_S:g}, or ${STALL_ENV}; 0: no bound)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="extract a LoRA from TUNED - BASE",
                       description="Extract a LoRA from TUNED - BASE and write it to -o.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("base", help="the original model (.safetensors, or .ckpt loaded safely)")
    p.add_argument("tuned", help="the fine-tuned model (same architecture)")
    p.add_argument("-o", "--output", metavar="OUT.safetensors",
                   help="the LoRA file to write (not with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the error against file size from the spectra; write no file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never one of the inputs)")
    _add_extract_options(p)
    add_text_encoder_options(p)
    p.set_defaults(func=cmd_extract)
    p = sub.add_parser("demo", help="generate a small base/fine-tuned pair and extract it",
                       description="Generate a small base/fine-tuned pair and extract it.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dir", help="folder for the demo files (default: a new temp folder)")
    _add_extract_options(p)
    p.set_defaults(func=cmd_demo)
    add_validate_parser(sub)
    add_resize_parser(sub)
    add_merge_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * a.verbose, format="%(levelname)s %(message)s")
    if a.stall_timeout is not None:
        # Read by every run of this process (extract/waits.py); not part of any output.
        os.environ[STALL_ENV] = repr(a.stall_timeout)
    try:
        return a.func(a)
    except (ExtractionInputError, OSError) as e:
        # OSError: e.g. an unwritable --report path: one line naming the file, not a traceback.
        print(f"lora-extract: error: {with_flag_names(str(e))}", file=sys.stderr)
        return 2
    except ExtractionStalled as e:
        print(f"lora-extract: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("lora-extract: interrupted; no output file was written.", file=sys.stderr)
        return 130
