"""One peer extractor as a whole process, for ``benchmarks/peer_kinds.py``.

    python benchmarks/peer_process.py {full,kj} BASE TUNED RANK OUT.json [--once-per-shape]
                                      [--skip-shapes SHAPES.json]

Both peers are written here from their descriptions (no code of theirs is copied):
- ``full``: what ComfyUI's "Extract and Save Lora" (and KJ's ``svd_linalg``) does per layer:
  the float32 difference, ``torch.linalg.svd`` with full matrices, truncation to the rank;
- ``kj``: KJ's default: ``torch.svd_lowrank(diff, q=rank, niter=7)`` per layer.
Each writes its LoRA file (up/down per layer, ``OUT.json.safetensors``), like a real run, and
ends: the benchmark times the whole process and measures the per-layer error from that file
afterwards, outside the timed process (``peer_kinds.file_errors``). ``OUT.json`` also records when the
file was written (``end``), for the time before the interpreter's exit. ``--once-per-shape``: decompose only the first layer of each shape and
report its seconds (a full SVD's cost depends on the shape), for a total of count x seconds.
``--skip-shapes``: a JSON list of shapes (as ``str(tuple)``) already timed in the same run: their
layers are counted, not decomposed (with ``--once-per-shape``).
"""

from __future__ import annotations

import json
import sys
import time

T_START = time.time()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def factors(mat: torch.Tensor, method: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "full":
        u, s, vh = torch.linalg.svd(mat)                 # full_matrices=True, as the node does
        return u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    u, s, v = torch.svd_lowrank(mat, q=rank, niter=7)
    return u @ torch.diag(s), v.mT


def main() -> int:
    method, bp, tp, rank_s, out_json = sys.argv[1:6]
    once = "--once-per-shape" in sys.argv
    skip: set[str] = set()
    if "--skip-shapes" in sys.argv:
        with open(sys.argv[sys.argv.index("--skip-shapes") + 1]) as f:
            skip = set(json.load(f))
    rank = int(rank_s)
    out: dict[str, torch.Tensor] = {}
    per_shape: dict[str, dict[str, float]] = {}
    with safe_open(bp, "pt") as b, safe_open(tp, "pt") as t:
        keys = [k for k in t.keys() if len(t.get_slice(k).get_shape()) >= 2]
        t_first = time.time()
        for k in keys:
            shape = str(tuple(t.get_slice(k).get_shape()))
            if once and shape in per_shape:
                per_shape[shape]["count"] += 1
                continue
            if once and shape in skip:
                per_shape[shape] = {"count": 1, "seconds": None}
                continue
            t0 = time.time()
            diff = t.get_tensor(k).float() - b.get_tensor(k).float()
            mat = diff.flatten(1)
            up, down = factors(mat, method, min(rank, *mat.shape))
            out[k + ".lora_up"], out[k + ".lora_down"] = up.contiguous(), down.contiguous()
            per_shape.setdefault(shape, {"count": 1, "seconds": time.time() - t0})
    save_file(out, out_json + ".safetensors")
    t_end = time.time()
    with open(out_json, "w") as f:
        json.dump({"start": T_START, "first_layer": t_first, "end": t_end, "per_shape": per_shape,
                   "threads": torch.get_num_threads()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
