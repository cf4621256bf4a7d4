"""Write a diffusers-named Flux base/tuned pair that ComfyUI's UNETLoader detects as Flux.

    python -m tests.integration.make_diffusers_flux <folder> [--link-into <models/diffusion_models> ...]

(from the repository root, so that ``tests.support`` is importable).

``UNETLoader`` converts diffusers names to its own (``convert_diffusers_mmdit``: ``x_embedder``
means Flux) and then detects the architecture from the converted keys. ComfyUI 0.3.64 fixes the
Flux hidden size at 3072 and the context width at 4096 (0.33 reads them from the shapes), so the
pair has those sizes, with 1 double and 1 single block: ~0.55 G parameters, ~1.1 GB per file in
bf16. Files are written once to ``<folder>`` and symlinked into each ComfyUI's model folder.
The truth (per tensor) is the two files themselves; nothing here is committed.
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import save_file

from tests.support.diffusers_flux_model import flux_pair, flux_shapes

NAME = "tiny_flux_diffusers"
SHAPES = dict(hidden=3072, depth=1, depth_single=1, in_channels=16, context=4096, vec=64,
              head_dim=128, guidance=True, out_channels=16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--link-into", action="append", default=[])
    a = ap.parse_args()
    os.makedirs(a.folder, exist_ok=True)
    paths = {role: os.path.join(a.folder, f"{NAME}_{role}.safetensors") for role in ("base", "tuned")}
    if not all(os.path.exists(p) for p in paths.values()):
        torch.set_num_threads(2)
        base, tuned = flux_pair(flux_shapes(**SHAPES), seed=7, true_rank=8, noise=1e-3, dtype=torch.bfloat16)
        for role, sd in (("base", base), ("tuned", tuned)):
            tmp = paths[role] + ".tmp"
            save_file(sd, tmp)
            os.replace(tmp, paths[role])
    for folder in a.link_into:
        for p in paths.values():
            link = os.path.join(folder, os.path.basename(p))
            if not os.path.lexists(link):
                os.symlink(p, link)
    print(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
