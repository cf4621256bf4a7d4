"""Resize speed: QR-path SVD and the norms cache against dense SVD of up @ down, same run.

Generates an SDXL-shaped kohya LoRA (every UNet transformer linear + both text encoders, rank
128, fp16: about 870 MiB at --scale 1) and a base checkpoint holding the weights it targets
(real SDXL key names, CLIP-G with fused qkv), then resizes it with three recipes at once:

1. QR path, cold norms cache (base spectral/Frobenius norms computed and cached);
2. QR path, warm cache (no base tensor read at all);
3. dense path (form up @ down, full SVD), warm cache: the decomposition the QR path replaces.

Targets: dense / QR (both warm) >= 10x; QR cold / QR warm >= 2x. ``--scale`` keeps every shape
and scales the number of transformer blocks and text-encoder layers (for slow machines).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time

import torch

from lora_extract.extract.writer import save_safetensors_atomic
from lora_extract.resize import BaseModel, ResizeOptions, open_lora_input, parse_recipes, resize_lora
from lora_extract.resize.norm_cache import cache_path

RECIPES = "fro_ckpt=1,thr=-3.5:spn_ckpt=0.8,params=0.2,size={size}:spn_lora=1,thr=-1.2"
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
TE2 = "conditioner.embedders.1.model.transformer.resblocks."


def _transformer(prefix: str, c: int, depth: int) -> list[tuple[str, tuple[int, int]]]:
    out = [(prefix + "proj_in", (c, c)), (prefix + "proj_out", (c, c))]
    for t in range(depth):
        b = f"{prefix}transformer_blocks.{t}."
        out += [(b + f"attn1.{n}", (c, c)) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        out += [(b + "attn2.to_q", (c, c)), (b + "attn2.to_k", (c, 2048)), (b + "attn2.to_v", (c, 2048)),
                (b + "attn2.to_out.0", (c, c)), (b + "ff.net.0.proj", (8 * c, c)), (b + "ff.net.2", (c, 4 * c))]
    return out


def sdxl_layers(scale: float) -> list[tuple[str, str, tuple[int, int], int | None]]:
    """(LoRA prefix, base key, (out, in), fused-qkv chunk) for an SDXL kohya LoRA."""
    def n(count: int) -> int:
        return max(1, round(count * scale))
    unet = []
    for blk, c, depth in ((4, 640, 2), (5, 640, 2), (7, 1280, 10), (8, 1280, 10)):
        unet += _transformer(f"input_blocks.{blk}.1.", c, n(depth))
    unet += _transformer("middle_block.1.", 1280, n(10))
    for blk, c, depth in ((0, 1280, 10), (1, 1280, 10), (2, 1280, 10), (3, 640, 2), (4, 640, 2), (5, 640, 2)):
        unet += _transformer(f"output_blocks.{blk}.1.", c, n(depth))
    out = [("lora_unet_" + m.replace(".", "_"), UNET + m + ".weight", s, None) for m, s in unet]
    for i in range(n(12)):
        for name, s in (("self_attn.q_proj", (768, 768)), ("self_attn.k_proj", (768, 768)),
                        ("self_attn.v_proj", (768, 768)), ("self_attn.out_proj", (768, 768)),
                        ("mlp.fc1", (3072, 768)), ("mlp.fc2", (768, 3072))):
            out.append((f"lora_te1_text_model_encoder_layers_{i}_" + name.replace(".", "_"),
                        f"{TE1}{i}.{name}.weight", s, None))
    for i in range(n(32)):
        for j, q in enumerate(("q", "k", "v")):
            out.append((f"lora_te2_text_model_encoder_layers_{i}_self_attn_{q}_proj",
                        f"{TE2}{i}.attn.in_proj_weight", (1280, 1280), j))
        for name, key, s in (("self_attn_out_proj", "attn.out_proj.weight", (1280, 1280)),
                             ("mlp_fc1", "mlp.c_fc.weight", (5120, 1280)),
                             ("mlp_fc2", "mlp.c_proj.weight", (1280, 5120))):
            out.append((f"lora_te2_text_model_encoder_layers_{i}_{name}", f"{TE2}{i}.{key}", s, None))
    return out


def write_files(folder: str, scale: float, rank: int) -> tuple[str, str, int]:
    gen = torch.Generator().manual_seed(0)
    layers = sdxl_layers(scale)
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    decay = 0.97 ** torch.arange(rank, dtype=torch.float32)
    for prefix, key, (o, i), chunk in layers:
        if key not in base:
            rows = 3 * o if chunk is not None else o
            base[key] = (torch.randn(rows, i, generator=gen) / i ** 0.5).half()
        up = torch.randn(o, rank, generator=gen) * decay * 0.01
        down = torch.randn(rank, i, generator=gen) / i ** 0.5
        lora[prefix + ".lora_up.weight"] = up.half()
        lora[prefix + ".lora_down.weight"] = down.half()
        lora[prefix + ".alpha"] = torch.tensor(float(rank) / 2)
    base_path, lora_path = os.path.join(folder, "sdxl_base.safetensors"), os.path.join(folder, "sdxl_r128.safetensors")
    save_safetensors_atomic(base, base_path, overwrite=True)
    lora_bytes = save_safetensors_atomic(lora, lora_path, overwrite=True)
    return base_path, lora_path, lora_bytes


def run(base_path: str, lora_path: str, recipes: str, out: str, dense: bool) -> tuple[float, object]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = resize_lora(BaseModel.open(base_path), open_lora_input(lora_path), parse_recipes(recipes), out,
                         ResizeOptions(output_dtype="fp16", device="cpu", dense_svd=dense))
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of transformer blocks / TE layers")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="torch threads (1 avoids MKL spin-waiting when other jobs share the cores)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(a.threads)
    folder = a.dir or tempfile.mkdtemp(prefix="resize-bench-")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base_path, lora_path, lora_bytes = write_files(folder, a.scale, a.rank)
        gen_s = time.perf_counter() - t0
        recipes = RECIPES.format(size=round(lora_bytes / (1 << 20) / 4, 1))
        if os.path.exists(cache_path(base_path)):
            os.unlink(cache_path(base_path))
        cold, r_cold = run(base_path, lora_path, recipes, os.path.join(folder, "o1"), dense=False)
        warm, r_warm = run(base_path, lora_path, recipes, os.path.join(folder, "o2"), dense=False)
        dense, r_dense = run(base_path, lora_path, recipes, os.path.join(folder, "o3"), dense=True)
        same = ([o.rank_after for o in r_dense.outcomes] == [o.rank_after for o in r_warm.outcomes])
        result = {
            "scale": a.scale, "rank": a.rank, "threads": a.threads, "layers": r_cold.layers, "lora_mib": round(lora_bytes / (1 << 20), 1),
            "recipes": recipes, "generate_s": round(gen_s, 1),
            "qr_cold_s": round(cold, 2), "qr_warm_s": round(warm, 2), "dense_warm_s": round(dense, 2),
            "dense_cold_estimate_s": round(dense + cold - warm, 2),
            "dense_over_qr_warm": round(dense / warm, 1), "dense_cold_over_qr_cold": round((dense + cold - warm) / cold, 1),
            "qr_cold_over_warm": round(cold / warm, 1),
            "norms_computed_cold": r_cold.norms_computed, "norms_cached_warm": r_warm.norms_cached,
            "ranks_after_qr": [o.rank_after for o in r_warm.outcomes], "same_ranks_as_dense": same,
            "target_dense_over_qr_10x": dense / warm >= 10, "target_cache_2x": cold / warm >= 2,
        }
        print(json.dumps(result, indent=1))
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
    finally:
        if not a.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
