"""What a size budget costs: time and peak memory of a budgeted run against a fixed-rank run.

    python benchmarks/size_target_cost.py [--gib 2.0] [--algorithm svd_lowrank] [--rank 32]

On the generated pair of ``benchmarks/extract_memory.py`` (about ``--gib`` GiB per model in
bf16), in fresh processes one after the other: a fixed-rank run at ``--rank``, then a run with
``target_size_mb`` set to half of that run's tensors, with the same caps. Each reports its time
and peak anonymous memory (``RssAnon``, sampled every 10 ms). Targets: the budgeted run's peak
under 1 GiB, and its time at most 1.6x the fixed-rank run's (same run, same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_pairs import SDXL_DIT_MIX, params, specs, write_pair
from rss import AnonPeak


def measure(base: str, tuned: str, algorithm: str, rank: int, target_mb: float) -> None:
    import torch

    from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_lora

    torch.set_num_threads(2)
    cfg = ExtractConfig(rank=rank, algorithm=algorithm, target_size_mb=target_mb)
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        res = extract_lora(SafetensorsSource(base), SafetensorsSource(tuned), cfg)
        secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_mib": mem.peak_kib / 1024,
                      "start_mib": mem.start_kib / 1024, "tensor_bytes": res.report.tensor_bytes}))


def run(bp: str, tp: str, algorithm: str, rank: int, target_mb: float) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--algorithm", algorithm,
                          "--rank", str(rank), "--measure", bp, tp, str(target_mb)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--algorithm", default="svd_lowrank")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(a.measure[0], a.measure[1], a.algorithm, a.rank, float(a.measure[2]))
        return 0
    unit = params(specs(SDXL_DIT_MIX)) * 2 / 2**30
    layers = specs(SDXL_DIT_MIX, a.gib / unit)
    print(f"pair: {params(layers) * 2 / 2**30:.2f} GiB per model in bf16, {a.algorithm}, "
          f"rank (cap) {a.rank}", flush=True)
    bp, tp = write_pair(layers)
    fixed = run(bp, tp, a.algorithm, a.rank, 0.0)
    target = fixed["tensor_bytes"] / 2 / 2**20
    budgeted = run(bp, tp, a.algorithm, a.rank, target)
    for name, r in (("fixed rank", fixed), (f"budget {target:.1f} MiB", budgeted)):
        print(f"{name:>20}: {r['seconds']:6.1f} s, peak {r['peak_mib']:5.0f} MiB "
              f"(before {r['start_mib']:.0f}), tensors {r['tensor_bytes'] / 2**20:.1f} MiB")
    ratio = budgeted["seconds"] / fixed["seconds"]
    print(f"time ratio budgeted / fixed: {ratio:.2f}x (target <= 1.6x: "
          f"{'met' if ratio <= 1.6 else 'NOT met'}); budgeted peak < 1024 MiB: "
          f"{'met' if budgeted['peak_mib'] < 1024 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
