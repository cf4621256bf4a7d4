"""V1 vs V2 (block-swap manager) on one generated pair streamed from files, in one run.

    python benchmarks/v2_speed.py [--device cpu|cuda] [--rank 32] [--algorithm svd_lowrank]
                                  [--lowrank-iters 2] [--modes conservative,balanced,...]

The pair (cached in benchmarks/out/) has SDXL-like blocks (1280-channel attention, FF and 3x3
convs in input/middle/output blocks) and DiT-like blocks (fused qkv 9216x3072, MLP
12288x3072 / 3072x12288), about 1.1 GB per model in bf16. Every variant runs in a fresh process
(V1 first and last, its mean is the baseline) after the files are read once so the page cache
is equally warm for all. Prints wall time, the ratio V1/V2 (> 1: V2 faster), peak anonymous
host memory (RssAnon, sampled every 10 ms) and peak VRAM ("n/a" without CUDA), and checks that
every variant produced the same ranks.

Targets (from the issue): on CPU, V2 balanced >= 1.2x V1 with <= 1.5x its peak RSS; on a GPU,
aggressive >= 1.5x V1. The script reports; it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pairs import params, write_pair  # noqa: E402 - after the path tweak above
from rss import AnonPeak  # noqa: E402

from lora_extract.extract.synthetic import LayerSpec  # noqa: E402

MODES = ("conservative", "balanced", "aggressive", "maximum")


def layers() -> list[LayerSpec]:
    out: list[LayerSpec] = []

    def add(key: str, shape: tuple[int, ...]) -> None:
        out.append(LayerSpec(f"diffusion_model.{key}.weight", shape, 128))
        out.append(LayerSpec(f"diffusion_model.{key}.bias", (shape[0],), 1))

    c = 1280
    for block in ("input_blocks.7", "input_blocks.8", "middle_block", "output_blocks.0",
                  "output_blocks.1"):
        add(f"{block}.0.in_layers.2", (c, c, 3, 3))
        add(f"{block}.0.out_layers.3", (c, c, 3, 3))
        t = f"{block}.1.transformer_blocks.0"
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                     "attn2.to_out.0"):
            add(f"{t}.{name}", (c, c))
        add(f"{t}.attn2.to_k", (c, 2048))
        add(f"{t}.attn2.to_v", (c, 2048))
        add(f"{t}.ff.net.0.proj", (8 * c, c))
        add(f"{t}.ff.net.2", (c, 4 * c))
    h = 3072
    for b in range(2):
        add(f"double_blocks.{b}.img_attn.qkv", (3 * h, h))
        add(f"double_blocks.{b}.img_attn.proj", (h, h))
        add(f"double_blocks.{b}.img_mlp.0", (4 * h, h))
        add(f"double_blocks.{b}.img_mlp.2", (h, 4 * h))
    add("single_blocks.0.linear2", (h, 5 * h))
    return out


def child(a: argparse.Namespace) -> None:
    """One variant in this (fresh) process; prints one JSON line."""
    import torch

    from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_lora
    from lora_extract.memory.cache import ResidentCache
    from lora_extract.memory.planner import MemoryOptions
    from lora_extract.memory.streamed_extract import extract_lora_streamed

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = ExtractConfig(rank=a.rank, algorithm=a.algorithm, lowrank_iters=a.lowrank_iters,
                        device=a.device)
    base, tuned = SafetensorsSource(a.base), SafetensorsSource(a.tuned)
    if a.device == "cuda":
        # CUDA context, cuBLAS and cuSOLVER handles start on first use (seconds): outside the
        # timed part, so each variant is timed on a ready device as in a long-lived ComfyUI.
        x = torch.randn(256, 256, device="cuda")
        torch.linalg.svd(torch.stack([x, x]), full_matrices=False)
        torch.linalg.qr(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        if a.child == "v1":
            result = extract_lora(base, tuned, cfg)
        else:
            result = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode=a.child),
                                     cache=ResidentCache()).result
        if a.device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    start, peak = mem.start_kib, mem.peak_kib
    vram = torch.cuda.max_memory_allocated() if a.device == "cuda" else None
    assert result.report is not None
    ranks = [r.rank for r in result.report.layers]
    print(json.dumps({"variant": a.child, "seconds": secs, "rss_start_mib": start / 1024,
                      "rss_peak_mib": peak / 1024, "vram_peak_mib": None if vram is None else vram / 2**20,
                      "ranks": ranks}))


def run_variant(variant: str, base: str, tuned: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--base", base,
           "--tuned", tuned, "--device", a.device, "--rank", str(a.rank), "--algorithm",
           a.algorithm, "--lowrank-iters", str(a.lowrank_iters)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        # The child's own traceback says what went wrong (no CUDA, out of memory, ...).
        sys.exit(f"variant {variant} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--algorithm", default="svd_lowrank")
    ap.add_argument("--lowrank-iters", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--tuned", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    specs = layers()
    t0 = time.perf_counter()
    base, tuned = write_pair(specs)
    size = os.path.getsize(base)
    print(f"pair: {params(specs) / 1e6:.0f}M parameters, {size / 1e9:.2f} GB per model (bf16) "
          f"[{time.perf_counter() - t0:.0f} s to generate or find]; device {a.device}; rank "
          f"{a.rank} {a.algorithm} iters {a.lowrank_iters}")
    warm([base, tuned])
    modes = [m for m in a.modes.split(",") if m]
    runs = [run_variant("v1", base, tuned, a)]
    runs += [run_variant(m, base, tuned, a) for m in modes]
    runs.append(run_variant("v1", base, tuned, a))
    v1 = [r for r in runs if r["variant"] == "v1"]
    v1_secs = sum(r["seconds"] for r in v1) / len(v1)
    v1_rss = max(r["rss_peak_mib"] for r in v1)
    same = all(r["ranks"] == v1[0]["ranks"] for r in runs)
    print(f"{'variant':<14}{'wall s':>9}{'V1/V2':>8}{'peak RSS MiB':>14}{'RSS/V1':>8}{'peak VRAM MiB':>15}")
    for r in runs:
        vram = "n/a" if r["vram_peak_mib"] is None else f"{r['vram_peak_mib']:.0f}"
        print(f"{r['variant']:<14}{r['seconds']:>9.1f}{v1_secs / r['seconds']:>8.2f}"
              f"{r['rss_peak_mib']:>14.0f}{r['rss_peak_mib'] / v1_rss:>8.2f}{vram:>15}")
    v1_list = ", ".join(f"{r['seconds']:.1f}" for r in v1)
    print(f"V1 baseline: mean of {len(v1)} runs ({v1_list} s); "
          f"identical ranks in every variant: {same}")


if __name__ == "__main__":
    main()
