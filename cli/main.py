"""``lora-extract``: the extraction core on the command line, without ComfyUI.

Exit status: 0 success, 2 bad input (one line on stderr says why; no output file),
130 interrupted (Ctrl-C; no output file).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

from ..extract import ExtractConfig, ExtractionInputError, extract_to_file
from ..extract.devices import resolve_device
from ..extract.errors import ExtractionStalled
from ..extract.options import EXTRACT_OPTIONS
from ..extract.tempfiles import write_text_atomic
from ..extract.waits import DEFAULT_STALL_S, STALL_ENV
from .dry_run import run_dry
from .extract_streamed import (
    add_device_option,
    add_memory_options,
    memory_options,
    run_extract_streamed,
    wants_streamed,
)
from .flag_names import with_flag_names
from .help_format import DefaultsHelpFormatter
from .merge import add_parser as add_merge_parser
from .option_flags import add_option_flags, config_values
from .output_checks import check_distinct, check_output_file, check_output_folder
from .progress import progress_bar
from .resize import add_parser as add_resize_parser
from .text_encoders import add_text_encoder_options, open_model
from .validate import add_parser as add_validate_parser

log = logging.getLogger("lora_extract")


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    # The extraction options' flags come from their declarations (extract/options.py); the
    # ones below are the command line's own.
    add_option_flags(p, EXTRACT_OPTIONS)
    add_device_option(p)
    p.add_argument("--report", metavar="JSON", help="write the per-layer report as JSON here")
    p.add_argument("--prefetch", type=int, default=2, metavar="N",
                   help="layers read ahead in the background (layer-by-layer engine)")
    add_memory_options(p)


def _config(a: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(**config_values(a, EXTRACT_OPTIONS),
                         device=resolve_device(a.device)).validate()


def run_extract(base_path: str, tuned_path: str, out: str, cfg: ExtractConfig,
                report_path: str | None, prefetch: int, overwrite: bool = False,
                text_encoders: bool = False, args: argparse.Namespace | None = None) -> int:
    if args is not None and wants_streamed(args):
        return run_extract_streamed(base_path, tuned_path, out, cfg, memory_options(args),
                                    report_path, overwrite, text_encoders=text_encoders)
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


def run_as_process(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``lora-extract`` command (and ``python -m lora_extract.cli``): ``main``, then the
    process ends at once with its exit code, skipping the interpreter's teardown.

    With torch loaded that teardown (module clean-up, thread pools) took ~0.4 s of every run
    on a 2-core CPU, a third of a small job's time. Nothing is lost by skipping it: every output
    file is written to a temporary name, closed and renamed before ``main`` returns, and the
    log handlers and both streams are flushed here. An exception ``main`` does not handle
    (a bug: it prints its traceback) and ``SystemExit`` (``--help``, argument errors) take the
    normal way out.

    Everything imported by then lives until the end: ``gc.freeze`` takes it out of the cyclic
    collector's view, whose full passes over torch's objects took ~0.08 s each during a run.
    """
    gc.freeze()
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

