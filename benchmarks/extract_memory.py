"""Peak memory of file-streamed extraction: it should track the largest layer, not the model.

    python benchmarks/extract_memory.py [--gib 2.0] [--algorithm svd_lowrank]

Generates (once, cached in benchmarks/out/) a base/fine-tuned pair of about ``--gib`` GiB each
in bf16, then extracts rank 32 from the files in a fresh process while a sampler thread reads
``RssAnon`` from /proc/self/status every 10 ms. Mapped file pages are not counted (the reader
uses pread, so file data lives in the reclaimable page cache). Target: peak anonymous memory
under 1 GiB for a pair of 2 GB bf16 models.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench_pairs import params, specs, write_pair
from rss import AnonPeak


def measure(base: str, tuned: str, algorithm: str) -> None:
    import torch

    from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_lora

    torch.set_num_threads(2)
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        res = extract_lora(SafetensorsSource(base), SafetensorsSource(tuned),
                           ExtractConfig(rank=32, algorithm=algorithm))
        secs = time.perf_counter() - t0
    start, peak = mem.start_kib, mem.peak_kib
    largest = max(r.shape[0] * (r.shape[1] if len(r.shape) > 1 else 1) * 4 for r in res.report.layers)
    print(f"extraction {secs:.1f} s; anonymous memory: before {start / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
          f"added {(peak - start) / 1024:.0f} MiB; largest layer in float32 {largest / 2**20:.0f} MiB; "
          f"target peak < 1024 MiB: {'met' if peak < 1024 * 1024 else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--algorithm", default="svd_lowrank")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(*a.measure, a.algorithm)
        return 0
    from bench_pairs import SDXL_DIT_MIX

    unit = params(specs(SDXL_DIT_MIX)) * 2 / 2**30
    layers = specs(SDXL_DIT_MIX, a.gib / unit)
    print(f"pair: {params(layers) * 2 / 2**30:.2f} GiB per model in bf16", flush=True)
    bp, tp = write_pair(layers)
    # A fresh process: generation memory must not count.
    return subprocess.call([sys.executable, os.path.abspath(__file__), "--algorithm", a.algorithm,
                            "--measure", bp, tp], cwd=os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    sys.exit(main())
