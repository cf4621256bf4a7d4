"""Cost of reading quantized inputs: the same pair in bf16 and in scaled fp8, extracted whole.

Writes a base/fine-tune pair of ``--mb`` MiB per model (in bf16; the scaled-fp8 copy holds the
same weights quantized), runs ``lora-extract extract --rank 32 --algorithm svd_lowrank`` on
each as a separate process, and prints the wall and CPU time, their ratios against bf16 and
each process's peak RSS (its VmHWM). Targets (docs/model-formats.md): ratio <= 1.3, peak RSS <= 1 GiB.

Another storage format joins by one entry in ``WRITERS``: a function that writes the pair
``(base_path, tuned_path)`` from the float weights it is given.

    python benchmarks/quantized_cost.py --mb 1024
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for tests.support
from tests.support.quant_files import fp8_quantize  # noqa: E402

WIDTH = 3072  # a Flux/Wan-sized linear layer


def model_layers(mb: int, tuned: bool, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, float32 weight) of the base (or the fine-tune: base plus a rank-64 change), adding
    up to ``mb`` MiB in bf16. Both models come from the same seed, one at a time, so writing a
    pair never holds more than one model."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, mb * 2**20 // (WIDTH * WIDTH * 2))
    for i in range(n):
        w = torch.randn(WIDTH, WIDTH, generator=g) * 0.02
        delta = torch.randn(WIDTH, 64, generator=g) @ torch.randn(64, WIDTH, generator=g) * 2e-4
        yield f"blocks.{i}.ff.weight", w + delta if tuned else w


def _write_pair(folder: str, mb: int, name: str,
                store: Callable[[dict[str, torch.Tensor], str, torch.Tensor], None]
                ) -> tuple[str, str]:
    paths = (os.path.join(folder, f"{name}_base.safetensors"),
             os.path.join(folder, f"{name}_tuned.safetensors"))
    for path, tuned in zip(paths, (False, True), strict=True):
        sd: dict[str, torch.Tensor] = {}
        for k, w in model_layers(mb, tuned):
            store(sd, k, w)
        save_file(sd, path)
        del sd
    return paths


def _store_bf16(sd: dict[str, torch.Tensor], key: str, w: torch.Tensor) -> None:
    sd[key] = w.bfloat16()


def _store_scaled_fp8(sd: dict[str, torch.Tensor], key: str, w: torch.Tensor) -> None:
    # The layout of tests/support/quant_files.write_scaled_fp8, built one layer at a time.
    sd.setdefault("scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn))
    layer = key.removesuffix(".weight")
    sd[key], sd[f"{layer}.scale_weight"] = fp8_quantize(w)
    sd[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)


def write_bf16(folder: str, mb: int) -> tuple[str, str]:
    return _write_pair(folder, mb, "bf16", _store_bf16)


def write_fp8_scaled(folder: str, mb: int) -> tuple[str, str]:
    return _write_pair(folder, mb, "fp8", _store_scaled_fp8)


WRITERS: dict[str, Callable[[str, int], tuple[str, str]]] = {
    "bf16": write_bf16,
    "fp8 scaled": write_fp8_scaled,
}

# The child reports its own peak RSS as VmHWM, not ru_maxrss: after the fork/exec that starts
# it, Linux carries the parent's high-water mark into the child's ru_maxrss, so a benchmark
# that just wrote gigabytes of weights would report its own peak as the extraction's.
RUN = ("import resource, sys; from lora_extract.cli.main import main; rc = main(sys.argv[1:]); "
       "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'));"
       "u = resource.getrusage(resource.RUSAGE_SELF); "
       "print('PEAK_RSS_KB', hwm, 'CPU_S', u.ru_utime + u.ru_stime); sys.exit(rc)")


def extract(base: str, tuned: str, out: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS bytes of one ``lora-extract extract`` process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, "extract", base, tuned, "-o", out, "--rank", "32",
                        "--algorithm", "svd_lowrank", "--overwrite", "--device", "cpu"],
                       capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    line = next(line.split() for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, float(line[3]), int(line[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="MiB per model in bf16")
    ap.add_argument("--dir", default=None, help="where to write the pairs (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per format, alternating formats; the fastest run of each counts")
    ap.add_argument("--formats", default=",".join(WRITERS),
                    help=f"comma-separated, the first is the reference (default: {','.join(WRITERS)})")
    a = ap.parse_args()
    names = [n.strip() for n in a.formats.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        pairs = {name: WRITERS[name](folder, a.mb) for name in names}
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
        for _ in range(a.repeat):
            # Alternating formats: a shared machine's load changes over minutes.
            for name in names:
                runs[name].append(extract(*pairs[name], os.path.join(folder, "lora.safetensors")))
    best = {name: (min(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs))
            for name, rs in runs.items()}
    wall_ref, cpu_ref, _ = best[names[0]]
    print(f"pair: {a.mb} MiB per model in bf16, {WIDTH}x{WIDTH} layers, rank 32 svd_lowrank, "
          f"{os.cpu_count()} CPUs, best of {a.repeat}")
    print(f"{'format':<12} {'wall s':>7} {'x ref':>6} {'CPU s':>7} {'x ref':>6} {'peak RSS MiB':>13}")
    for name, (wall, cpu, peak) in best.items():
        print(f"{name:<12} {wall:7.1f} {wall / wall_ref:6.2f} {cpu:7.1f} {cpu / cpu_ref:6.2f} "
              f"{peak / 2**20:13.0f}")


if __name__ == "__main__":
    main()
