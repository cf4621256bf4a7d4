"""Make a tiny SD1.5-architecture UNet with a real-shape CLIP-L text encoder, base and tuned.

Run with ComfyUI's Python (it imports ``comfy`` to take the architectures from ComfyUI itself):

    COMFYUI_ROOT=~/comfyui ~/comfyvenv/bin/python scripts/make_tiny_sd15_clip.py [--models DIR]

Writes (fp16, generated, never committed; about 250 MB per CLIP, 340 MB per checkpoint):

- ``checkpoints/tiny_sd15_clip_{base,tuned}.safetensors``: whole SD1.x checkpoints
  (``model.diffusion_model.*`` + ``cond_stage_model.transformer.text_model.*``, no VAE: ComfyUI
  then builds an empty default VAE) for ``CheckpointLoaderSimple``;
- ``clip/tiny_clip_l_{base,tuned}.safetensors``: the CLIP-L alone, in the HF layout
  ``CLIPLoader`` (type ``stable_diffusion``) reads.

The UNet is the 2-level SD1.5 configuration of ``scripts/comfyui/make_tiny_models.py`` (detected
by ComfyUI as SD15); the CLIP-L has the real shapes (12 layers, 768 wide, 49408 tokens).
Tuned = base + a seeded low-rank delta (rank 4-8, decaying spectrum) + 3% dense noise on every
matrix, and small noise on every vector, in both the UNet and the CLIP; so an extraction at
rank 8 can be held to the optimal rank-8 error of each delta.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zlib

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", os.path.expanduser("~/comfyui"))
sys.path.insert(0, COMFYUI_ROOT)

import comfy.cli_args  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management is imported: never touch CUDA
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}
RANK_MIN, RANK_MAX = 4, 8
LOWRANK_REL, NOISE_REL, VECTOR_REL = 0.08, 0.03, 0.02


def _gen(seed: int, name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{salt}:{name}".encode())) % 2**63)


def _shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    unet = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({}, "").diffusion_model
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float16)
    u = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    # The parts of ComfyUI's CLIP-L that SD1.x files store (ComfyUI drops the others when saving).
    c = {k[len("transformer."):]: tuple(v.shape) for k, v in clip.state_dict().items()
         if k.startswith("transformer.text_model.")}
    return u, c


def _base(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen(seed, name, "base")
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if name.endswith(".weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _delta(name: str, w: torch.Tensor, seed: int) -> torch.Tensor:
    g = _gen(seed, name, "delta")
    if w.dim() >= 2:
        m, n = w.shape[0], math.prod(w.shape[1:])
        r = min(RANK_MIN + int(torch.randint(0, RANK_MAX - RANK_MIN + 1, (1,), generator=g)), m, n)
        s = torch.tensor([0.8 ** i for i in range(r)])
        s *= LOWRANK_REL * float(w.norm()) / float(s.norm())
        u = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        low = (u * s) @ v.T
        noise = torch.randn(m, n, generator=g)
        low += noise * (NOISE_REL * float(low.norm()) / float(noise.norm()))
        return low.reshape(w.shape)
    rms = float(w.pow(2).mean().sqrt()) or 1e-3
    return VECTOR_REL * rms * torch.randn(w.shape, generator=g)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=os.path.join(COMFYUI_ROOT, "models"),
                    help="ComfyUI's models folder (checkpoints/ and clip/ are written under it)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    unet_shapes, clip_shapes = _shapes()
    for sub in ("checkpoints", "clip"):
        os.makedirs(os.path.join(a.models, sub), exist_ok=True)
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {"base": {}, "tuned": {}}
    for part, shapes in (("unet", unet_shapes), ("clip", clip_shapes)):
        b, t = {}, {}
        for k, shape in shapes.items():
            w = _base(f"{part}.{k}", shape, a.seed)
            b[k] = w.half()
            t[k] = (w + _delta(f"{part}.{k}", w, a.seed)).half()
        out["base"][part], out["tuned"][part] = b, t
    for name, parts in out.items():
        clip_file = os.path.join(a.models, "clip", f"tiny_clip_l_{name}.safetensors")
        save_file(parts["clip"], clip_file)
        ckpt = {"model.diffusion_model." + k: v for k, v in parts["unet"].items()}
        ckpt.update({"cond_stage_model.transformer." + k: v for k, v in parts["clip"].items()})
        ckpt_file = os.path.join(a.models, "checkpoints", f"tiny_sd15_clip_{name}.safetensors")
        save_file(ckpt, ckpt_file)
        print(f"wrote {clip_file} ({os.path.getsize(clip_file) >> 20} MiB) and {ckpt_file} "
              f"({os.path.getsize(ckpt_file) >> 20} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
