"""What each way of clamping the LoRA factors costs, against the optimal truncated SVD.

    python benchmarks/clamp_cost.py [--ranks 8 32] [--scale 0.25] [--dtype fp16] [--tiny DIR]
                                    [--methods ...] [--json out.json]

For every weight matrix of each pair it computes one exact SVD, builds the balanced factors
(``sqrt(S)`` on both sides, alpha = rank) at each rank, applies each clamp method, casts to the
output dtype, and measures ``||dW - up @ down||_F / ||dW||_F`` (float64 accumulation) divided by
the optimal error ``sqrt(sum_{i>k} sigma_i^2) / ||dW||_F`` (Eckart-Young). It prints the median
and worst ratio per method, per pair and rank. The bound for the default clamp is median <= 1.05
and worst <= 1.2.

Pairs:
- ``mix``: ``bench_pairs.SDXL_DIT_MIX`` (SDXL and DiT shapes; slowly decaying spectrum plus
  dense noise, base and tuned stored in bf16), scaled by ``--scale``, seed 1 (not the seed of
  the speed benchmarks);
- ``mix-lownoise``: the same shapes with a faster decay and little noise, so that the optimal
  error at rank 32 is small and any clamp error shows;
- ``tiny_*``: the real-architecture ComfyUI test models (``--tiny``, default
  ``~/comfyui/models/diffusion_models``, made by ``scripts/comfyui/setup_comfyui.sh models``) when present: base + seeded low-rank delta
  (rank 4-16) + small dense noise, in fp16.

The candidates, each with quantile q (default 0.99), on the balanced factors:
- ``global``: one threshold, the q quantile of |entries| of up and down together (the old
  default, KJ's rule on balanced factors);
- ``per_factor``: up clipped at the q quantile of |up|, down at that of |down|;
- ``component``: each rank component i (column i of up, row i of down) clipped at the q
  quantile of its own entries, both vectors together;
- ``component_factor``: each of those vectors clipped at the q quantile of its own entries;
- ``outlier_cX``: ``component_factor``'s thresholds times X: only entries X times beyond the
  vector's own q quantile are touched;
- ``library``: ``lora_extract.extract.clamp.clamp_factors``, what the pack does by default.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from bench_pairs import OUT, SDXL_DIT_MIX, specs, write_pair
from safetensors import safe_open

from lora_extract.extract.clamp import abs_quantile_rows, clamp_factors
from lora_extract.extract.config import OUTPUT_DTYPES
from lora_extract.extract.exact_svd import exact_svd
from lora_extract.extract.norms import frobenius_norm

ClampFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
DEFAULT_TINY = os.path.expanduser("~/comfyui/models/diffusion_models")


def _clip_rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clip row i of ``x`` to ``[-t_i, t_i]``."""
    t = t.unsqueeze(1)
    return torch.minimum(torch.maximum(x, -t), t)


def clamp_global(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = float(abs_quantile_rows(torch.cat([up.reshape(1, -1), down.reshape(1, -1)], 1), q)[0])
    return up.clamp(-t, t), down.clamp(-t, t)


def clamp_per_factor(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    tu = float(abs_quantile_rows(up.reshape(1, -1), q)[0])
    td = float(abs_quantile_rows(down.reshape(1, -1), q)[0])
    return up.clamp(-tu, tu), down.clamp(-td, td)


def clamp_component(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = abs_quantile_rows(torch.cat([up.T, down], 1), q)
    return _clip_rows(up.T, t).T, _clip_rows(down, t)


def outlier(factor: float) -> ClampFn:
    def fn(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
        tu = abs_quantile_rows(up.T, q) * factor
        td = abs_quantile_rows(down, q) * factor
        return _clip_rows(up.T, tu).T, _clip_rows(down, td)
    return fn


def clamp_library(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    u, d, _ = clamp_factors(up, down, q)
    return u, d


METHODS: dict[str, ClampFn | None] = {
    "none": None,
    "global": clamp_global,
    "per_factor": clamp_per_factor,
    "component": clamp_component,
    "component_factor": outlier(1.0),
    "outlier_c1.5": outlier(1.5),
    "outlier_c2": outlier(2.0),
    "outlier_c3": outlier(3.0),
    "library": clamp_library,
}


def read_pair(base_path: str, tuned_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, float32 difference) for every weight of 2 or more dimensions that changed."""
    with safe_open(base_path, "pt") as b, safe_open(tuned_path, "pt") as t:
        for key in t.keys():
            if key not in b.keys():
                continue
            tw = t.get_tensor(key)
            if tw.dim() < 2:
                continue
            d = tw.float() - b.get_tensor(key).float()
            if bool((d != 0).any()):
                yield key, d


def pairs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = []
    layers = [s for s in specs(SDXL_DIT_MIX, a.scale) if len(s.shape) >= 2]
    out.append(("mix", *write_pair(layers, seed=1)))
    out.append(("mix-lownoise", *write_pair(layers, seed=2, decay=0.9, noise=0.02)))
    for bp in sorted(glob.glob(os.path.join(a.tiny, "tiny_*_base.safetensors"))):
        tp = bp.replace("_base.safetensors", "_tuned.safetensors")
        if os.path.exists(tp):
            out.append((os.path.basename(bp)[: -len("_base.safetensors")], bp, tp))
    return out


def layer_ratios(diff: torch.Tensor, ranks: list[int], methods: list[str], q: float,
                 dtype: torch.dtype) -> dict[tuple[int, str], float]:
    """Error / optimal error of each (rank, method) on one difference."""
    mat = diff.reshape(diff.shape[0], -1)
    fro = frobenius_norm(mat)
    svd = exact_svd(mat)
    s2 = svd.S.double() ** 2
    out: dict[tuple[int, str], float] = {}
    for rank in ranks:
        k = min(rank, min(mat.shape))
        optimal = math.sqrt(float(s2[k:].sum())) / fro
        if optimal <= 1e-6:       # an exact low-rank difference: no ratio to speak of
            continue
        root = svd.S[:k].sqrt()
        up0 = svd.U[:, :k] * root
        down0 = svd.Vh[:k] * root.unsqueeze(1)
        for name in methods:
            fn = METHODS[name]
            up, down = (up0, down0) if fn is None else fn(up0, down0, q)
            res = mat - up.to(dtype).float() @ down.to(dtype).float()
            out[(rank, name)] = frobenius_norm(res) / fro / optimal
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--scale", type=float, default=0.25, help="layer counts of the generated mix")
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--dtype", default="fp16", choices=sorted(OUTPUT_DTYPES))
    ap.add_argument("--tiny", default=DEFAULT_TINY, help="folder of the tiny_* ComfyUI test models")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--pairs", nargs="*", default=None, help="only these pair names")
    ap.add_argument("--json", default=os.path.join(OUT, "clamp_cost.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the numbers, not the time, are the point; on a busy "
                         "machine one thread avoids spinning)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = OUTPUT_DTYPES[a.dtype]
    results: dict[str, dict[str, dict[str, object]]] = {}
    for name, bp, tp in pairs(a):
        if a.pairs and name not in a.pairs:
            continue
        t0 = time.perf_counter()
        per: dict[tuple[int, str], list[tuple[float, str]]] = {}
        for i, (key, diff) in enumerate(read_pair(bp, tp)):
            print(f"  {name} {i + 1}: {key} {list(diff.shape)}", file=sys.stderr, flush=True)
            for rm, r in layer_ratios(diff, a.ranks, a.methods, a.quantile, dtype).items():
                per.setdefault(rm, []).append((r, key))
        print(f"\n{name}: {len(per.get((a.ranks[0], a.methods[0]), []))} matrices, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        print("| rank | method | median | worst | worst layer |\n|---|---|---|---|---|")
        for (rank, method), vals in sorted(per.items(), key=lambda kv: (kv[0][0], a.methods.index(kv[0][1]))):
            med = statistics.median(v for v, _ in vals)
            worst, wkey = max(vals)
            print(f"| {rank} | {method} | {med:.4f} | {worst:.4f} | {wkey} |")
            results.setdefault(name, {}).setdefault(str(rank), {})[method] = {
                "median": med, "worst": worst, "worst_key": wkey, "layers": len(vals)}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"quantile": a.quantile, "dtype": a.dtype, "results": results}, f, indent=1)
    bound_ok = all(v["library"]["median"] <= 1.05 and v["library"]["worst"] <= 1.2
                   for ranks in results.values() for v in ranks.values() if "library" in v)
    print(f"\nlibrary default within the bound (median <= 1.05, worst <= 1.2) on every pair: {bound_ok}")
    return 0 if bound_ok else 1


if __name__ == "__main__":
    sys.exit(main())
