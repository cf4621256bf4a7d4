"""Numbers for the "Which settings?" guide (docs/settings.md): file size and error of each rank rule, and
exact against randomized SVD, on one generated pair, in one run.

    python benchmarks/settings_guide.py [--scale 0.25] [--json out.json]

The pair is bench_pairs.SDXL_DIT_MIX scaled down (one layer per family at --scale 0.25: SDXL
FF/attention/convs and DiT fused qkv/MLP shapes; deltas with a slowly decaying spectrum plus
dense noise, like real fine-tunes). Every row extracts the same pair in fp16 with the clamp off,
so the rows differ only in the rule (or the algorithm). Reported per row: file size (MiB of the
stored tensors), mean / median / worst relative error of the LoRA layers, whole-model error
(sqrt(sum ||residual||^2 / sum ||delta||^2) over the LoRA layers), rank range, and seconds.
Seconds are for comparison within the run only (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from bench_pairs import SDXL_DIT_MIX, params, specs, write_pair

from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_lora

# (label, config overrides); rank is the cap for the adaptive rules.
ROWS: list[tuple[str, dict]] = [
    ("standard rank 8", {"rank": 8}),
    ("standard rank 16", {"rank": 16}),
    ("standard rank 32", {"rank": 32}),
    ("standard rank 64", {"rank": 64}),
    ("adaptive_ratio 0.15 (cap 128)", {"rank": 128, "lora_type": "adaptive_ratio", "adaptive_param": 0.15}),
    ("adaptive_quantile 0.5 (cap 128)", {"rank": 128, "lora_type": "adaptive_quantile", "adaptive_param": 0.5}),
    ("adaptive_energy 0.9 (cap 128)", {"rank": 128, "lora_type": "adaptive_energy", "adaptive_param": 0.9}),
    ("adaptive_fro 0.9 (cap 128)", {"rank": 128, "lora_type": "adaptive_fro", "adaptive_param": 0.9}),
]


def measure(base, tuned, deltas: dict[str, float], cfg: ExtractConfig) -> dict:
    t0 = time.perf_counter()
    res = extract_lora(base, tuned, cfg)
    seconds = time.perf_counter() - t0
    rep = res.report
    lora = [r for r in rep.layers if r.status == "lora" and r.rel_error is not None]
    errs = [r.rel_error for r in lora]
    res2 = sum((r.rel_error * deltas[r.key]) ** 2 for r in lora)
    d2 = sum(deltas[r.key] ** 2 for r in lora)
    ranks = [r.rank for r in lora if r.rank]
    size = sum(t.numel() * t.element_size() for t in res.tensors.values())
    return {"mib": size / 2**20, "mean": statistics.fmean(errs), "median": statistics.median(errs),
            "worst": max(errs), "whole": math.sqrt(res2 / d2), "rank_min": min(ranks),
            "rank_max": max(ranks), "rank_mean": statistics.fmean(ranks), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = specs(SDXL_DIT_MIX, a.scale)
    bp, tp = write_pair(layers)
    base, tuned = SafetensorsSource(bp), SafetensorsSource(tp)
    deltas = {k: float(torch.linalg.vector_norm(tuned.get(k, "cpu", torch.float32) - base.get(k, "cpu", torch.float32),
                                                dtype=torch.float64))
              for k in tuned.keys()}
    print(f"pair: {len([s for s in layers if len(s.shape) >= 2])} matrices/convs, "
          f"{params(layers) / 1e6:.0f}M parameters; fp16 output, clamp off; torch threads {torch.get_num_threads()}")
    common = {"output_dtype": "fp16", "clamp_quantile": None}
    out = {"rules": {}, "algorithms": {}}
    for label, over in ROWS:
        m = measure(base, tuned, deltas, ExtractConfig(algorithm="svd_lowrank", **common, **over))
        out["rules"][label] = m
        print(f"{label:34s} {m['mib']:7.1f} MiB  error mean {100 * m['mean']:5.1f}%  median "
              f"{100 * m['median']:5.1f}%  worst {100 * m['worst']:5.1f}%  whole {100 * m['whole']:5.1f}%  "
              f"ranks {m['rank_min']}..{m['rank_max']} (mean {m['rank_mean']:.1f})  {m['seconds']:.1f} s", flush=True)
    for algo in ("svd_linalg", "svd_lowrank"):
        m = measure(base, tuned, deltas, ExtractConfig(rank=32, algorithm=algo, **common))
        out["algorithms"][algo] = m
        print(f"rank 32 {algo:12s} whole error {100 * m['whole']:.3f}%  {m['seconds']:.1f} s", flush=True)
    ex, lo = out["algorithms"]["svd_linalg"], out["algorithms"]["svd_lowrank"]
    print(f"randomized vs exact: {ex['seconds'] / lo['seconds']:.1f}x faster, whole error x{lo['whole'] / ex['whole']:.5f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
