"""Cost of reading quantized inputs: the same pair in bf16 and in scaled fp8, extracted whole.

Writes a base/fine-tune pair of ``--mb`` MiB per model (in bf16; the scaled-fp8 copy holds the
same weights quantized), runs ``lora-extract extract --rank 32 --algorithm svd_lowrank`` on
each as a separate process, and prints the wall time, the time ratio against bf16 and each
process's peak RSS. Targets (docs/model-formats.md): ratio <= 1.3, peak RSS <= 1 GiB.

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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from quant_files import write_scaled_fp8  # noqa: E402

WIDTH = 3072  # a Flux/Wan-sized linear layer


def layers(mb: int, seed: int = 0) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, base, tuned) float32 weights adding up to ``mb`` MiB in bf16."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, mb * 2**20 // (WIDTH * WIDTH * 2))
    for i in range(n):
        base = torch.randn(WIDTH, WIDTH, generator=g) * 0.02
        delta = torch.randn(WIDTH, 64, generator=g) @ torch.randn(64, WIDTH, generator=g) * 2e-4
        yield f"blocks.{i}.ff.weight", base, base + delta


def write_bf16(folder: str, mb: int) -> tuple[str, str]:
    b, t = {}, {}
    for k, base, tuned in layers(mb):
        b[k], t[k] = base.bfloat16(), tuned.bfloat16()
    paths = os.path.join(folder, "bf16_base.safetensors"), os.path.join(folder, "bf16_tuned.safetensors")
    save_file(b, paths[0])
    save_file(t, paths[1])
    return paths


def write_fp8_scaled(folder: str, mb: int) -> tuple[str, str]:
    b, t = {}, {}
    for k, base, tuned in layers(mb):
        b[k], t[k] = base, tuned
    paths = os.path.join(folder, "fp8_base.safetensors"), os.path.join(folder, "fp8_tuned.safetensors")
    write_scaled_fp8(paths[0], b, {})
    write_scaled_fp8(paths[1], t, {})
    return paths


WRITERS: dict[str, Callable[[str, int], tuple[str, str]]] = {
    "bf16": write_bf16,
    "fp8 scaled": write_fp8_scaled,
}

RUN = ("import resource, sys; from lora_extract.cli.main import main; rc = main(sys.argv[1:]); "
       "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def extract(base: str, tuned: str, out: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, "extract", base, tuned, "-o", out, "--rank", "32",
                        "--algorithm", "svd_lowrank", "--overwrite", "--device", "cpu"],
                       capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    peak = next(int(line.split()[1]) for line in r.stdout.splitlines()
                if line.startswith("PEAK_RSS_KB"))
    return seconds, peak * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="MiB per model in bf16")
    ap.add_argument("--dir", default=None, help="where to write the pairs (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        rows = []
        for name, writer in WRITERS.items():
            base, tuned = writer(folder, a.mb)
            seconds, peak = extract(base, tuned, os.path.join(folder, "lora.safetensors"))
            rows.append((name, seconds, peak))
            for p in (base, tuned):
                os.remove(p)
        ref = rows[0][1]
        print(f"pair: {a.mb} MiB per model in bf16, {WIDTH}x{WIDTH} layers, rank 32 svd_lowrank")
        print(f"{'format':<12} {'seconds':>8} {'x bf16':>7} {'peak RSS MiB':>13}")
        for name, seconds, peak in rows:
            print(f"{name:<12} {seconds:8.1f} {seconds / ref:7.2f} {peak / 2**20:13.0f}")


if __name__ == "__main__":
    main()
