"""DoRA output against plain LoRA at the same file size, on generated fine-tunes.

Two generated pairs (the demo block of ``extract/synthetic.py`` at width 320):

- ``low-rank``: each matrix changes by a decaying low-rank delta plus noise (no rescale);
- ``rescale``: the same, and each output channel of every matrix is also rescaled by a few
  percent (what a DoRA-trained fine-tune, or a norm folded into the weights, does).

For each: plain LoRA at rank r, DoRA (output and input axis) at rank r, and plain LoRA whose
size budget (``target_size_mb``) is the DoRA file's tensor bytes, so the magnitudes' bytes go
to ranks instead. Prints a Markdown table of mean and worst layer error and tensor bytes.

    python benchmarks/dora_vs_lora.py [--rank 16] [--width 320]
"""

from __future__ import annotations

import argparse
import math

import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import demo_layers, make_pair

MIB = 2**20


def _rescaled(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], spread: float,
              seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in tuned.items():
        if t.dim() >= 2 and k.endswith(".weight"):
            c = 1 + spread * torch.randn(t.shape[0], *[1] * (t.dim() - 1), generator=g)
            out[k] = base[k] + (t - base[k]) + (c - 1) * base[k]
        else:
            out[k] = t
    return out


def _row(name: str, res) -> str:
    s = res.report.summary()
    return (f"| {name} | {s.mean_error:.4f} | {s.worst_error:.4f} | "
            f"{res.report.tensor_bytes / 1024:.1f} KiB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=320)
    a = ap.parse_args()
    layers = [s for s in demo_layers(a.width) if len(s.shape) >= 2 and s.key.endswith(".weight")
              and s.rank > 0]
    base, low = make_pair(layers, seed=0)
    pairs = {"low-rank": low, "rescale 3%": _rescaled(base, low, 0.03, 1)}
    for name, tuned in pairs.items():
        print(f"\n{name} (rank {a.rank}, fp16)\n")
        print("| output | mean error | worst error | tensors |\n|---|---|---|---|")
        b, t = StateDictSource(base, "base"), StateDictSource(tuned, "tuned")
        print(_row("plain LoRA", extract_lora(b, t, ExtractConfig(rank=a.rank, bias_diff=False))))
        for axis in ("output", "input"):
            dora = extract_lora(b, t, ExtractConfig(rank=a.rank, bias_diff=False, dora=axis))
            print(_row(f"DoRA, {axis} axis", dora))
            mib = math.ceil(dora.report.tensor_bytes / MIB * 1e4) / 1e4
            budget = extract_lora(b, t, ExtractConfig(rank=4 * a.rank, bias_diff=False,
                                                      target_size_mb=mib))
            print(_row(f"plain LoRA in DoRA-{axis}'s bytes", budget))
            same = [r.lora_same_size_error for r in dora.report.layers if r.dora_axis]
            print(f"| (per layer: plain LoRA in each layer's DoRA bytes) | "
                  f"{sum(same) / len(same):.4f} | {max(same):.4f} | |")


if __name__ == "__main__":
    main()
