"""Ours against every CPU peer, on several kinds of generated pair, as whole processes, one run.

    python benchmarks/peer_kinds.py [--kinds sdxl,dit,...] [--scale 1.0] [--rank 32]
                                    [--full-svd per-shape|all|skip] [--repeat 2] [--json out.json]

Kinds of pair (shapes from ``bench_pairs.py``; every delta a structured part plus dense noise):
- ``sdxl``: SDXL-like layers (10240x1280 FF, 1280x1280 attention, 3x3 convs, many small ones);
- ``dit``: DiT-like layers (9216x3072 fused qkv, 3072x12288 MLPs, 1280x11520 convs);
- ``mixed``: both (the pair of ``extract_speed.py``);
- ``slow``: the mixed shapes with a slowly decaying spectrum (decay 0.995, heavy noise);
- ``lowrank``: the mixed shapes with a clean rank-16 change and a faint noise floor (a merged
  LoRA), extracted past its rank, where only the noise floor is left out;
- ``hard``: the DiT shapes with a rank-128 structure decaying by 0.995 and little noise: the
  singular values around the rank barely decay, so the power iterations converge slowest,
  the one we expect to be hardest for us.

Each extractor runs as a fresh process, timed whole (interpreter start, imports, reading both
files, writing the LoRA file, the interpreter's exit), rank ``--rank``, fp32 factors, no clamp,
default threads, from compiled bytecode as an installed package runs (``child_env``). The
peers' errors are measured from their files after their processes end; KJ's time until its
file was written (before its exit, ~0.4 s with torch loaded) is reported alongside:
- ours ``svd_lowrank`` (randomized, the fast one) and ours ``svd_linalg`` (exact, the nodes' default): ``lora-extract extract``;
- KJ's default, ``torch.svd_lowrank(q=rank, niter=7)`` per layer (``peer_process.py kj``);
- the full SVD per layer (ComfyUI's "Extract and Save Lora", KJ's ``svd_linalg``;
  ``peer_process.py full``). ``--full-svd per-shape`` (default) decomposes the first layer of
  each shape and counts it once per layer of that shape (its cost depends on the shape, and
  the whole set would take the longest of all runs by far), once per run: a later kind with a
  shape timed before reuses its seconds; ``all`` runs every layer.
Ours and KJ's alternate ``--repeat`` times; medians are reported. Error / optimum per layer:
each extractor's relative error over the exact truncated SVD's (ours ``svd_linalg``, which is
optimal to float rounding). Targets: lowrank >= 20x full SVD and >= 1.3x KJ at error <= 1.001x
the optimum; exact >= 3x full SVD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_pairs import DIT_MIX, SDXL_DIT_MIX, specs, write_pair  # noqa: E402

from lora_extract.extract.synthetic import LayerSpec  # noqa: E402

SDXL_MIX: list[tuple[tuple[int, ...], int, str]] = [
    ((10240, 1280), 4, "ff"),
    ((1280, 5120), 4, "ff_out"),
    ((1280, 1280), 12, "attn"),
    ((1280, 2048), 4, "attn2"),
    ((1280, 1280, 3, 3), 3, "conv"),
    ((640, 640, 3, 3), 4, "conv640"),
    ((640, 640), 8, "attn640"),
    ((5120, 640), 2, "ff640"),
    ((320, 320, 3, 3), 4, "conv320"),
]

# kind: (mix, structured rank, decay, noise)
KINDS: dict[str, tuple[list[tuple[tuple[int, ...], int, str]], int, float, float]] = {
    "sdxl": (SDXL_MIX, 128, 0.985, 0.3),
    "dit": (DIT_MIX, 128, 0.985, 0.3),
    "mixed": (SDXL_DIT_MIX, 128, 0.985, 0.3),
    "slow": (SDXL_DIT_MIX, 128, 0.995, 0.6),
    "lowrank": (SDXL_DIT_MIX, 16, 0.8, 0.002),
    "hard": (DIT_MIX, 128, 0.995, 0.05),
}


def kind_layers(kind: str, scale: float) -> list[LayerSpec]:
    mix, rank, _, _ = KINDS[kind]
    return [LayerSpec(s.key, s.shape, rank if len(s.shape) > 1 else 1) for s in specs(mix, scale)]


def child_env() -> dict[str, str]:
    """The timed processes' environment: this one, with Python's bytecode cache on.

    An installed package runs from its compiled bytecode (``pip install`` compiles it, and the
    first run writes what is missing); with ``PYTHONDONTWRITEBYTECODE`` set every run would
    compile the pack's ~120 modules again (~0.17 s per run on a 2-core CPU), which no user's
    run pays. ``warm_bytecode`` compiles them before the first timed run.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_bytecode() -> None:
    """Compile the pack's modules (and this folder's) into their bytecode caches once."""
    import lora_extract

    for folder in (os.path.dirname(os.path.abspath(lora_extract.__file__)), HERE):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"[/\\](out|tests)[/\\]",
                        folder], check=False, capture_output=True, env=child_env())


def run_ours(bp: str, tp: str, rank: int, algorithm: str, tmp: str) -> tuple[float, dict[str, float]]:
    out, rep = os.path.join(tmp, f"ours-{algorithm}.safetensors"), os.path.join(tmp, "report.json")
    cmd = [sys.executable, "-m", "lora_extract.cli", "extract", bp, tp, "-o", out, "--overwrite",
           "--rank", str(rank), "--conv-rank", str(rank), "--algorithm", algorithm,
           "--no-clamp", "--dtype", "fp32", "--device", "cpu", "--report", rep]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env=child_env())
    secs = time.time() - t0
    with open(rep) as f:
        layers = json.load(f)["layers"]
    return secs, {r["key"]: r["rel_error"] for r in layers if r["status"] == "lora"}


def file_errors(bp: str, tp: str, lora_path: str) -> dict[str, float]:
    """Per layer of a peer's LoRA file: ``||dW - up @ down|| / ||dW||`` in float64."""
    import torch
    from safetensors import safe_open

    errors: dict[str, float] = {}
    with safe_open(bp, "pt") as b, safe_open(tp, "pt") as t, safe_open(lora_path, "pt") as lo:
        for name in lo.keys():
            if not name.endswith(".lora_up"):
                continue
            k = name[: -len(".lora_up")]
            mat = (t.get_tensor(k).double() - b.get_tensor(k).double()).flatten(1)
            up, down = lo.get_tensor(name).double(), lo.get_tensor(k + ".lora_down").double()
            errors[k] = float(torch.linalg.norm(mat - up @ down) / torch.linalg.norm(mat))
    return errors


def run_peer(method: str, bp: str, tp: str, rank: int, tmp: str, once: bool,
             shape_secs: dict[str, float] | None = None) -> tuple[float, dict[str, float], float]:
    """Seconds of the whole process, per-layer errors (from its file), and the seconds until
    its file was written (before the interpreter's exit).

    ``shape_secs``: with ``once``, per-shape seconds timed earlier in this run (a full SVD's
    cost depends on the shape only): those shapes are not decomposed again; the dict gets the
    newly timed ones; the seconds are then the estimate ``first layer + count x seconds``."""
    out = os.path.join(tmp, f"{method}.json")
    cmd = [sys.executable, os.path.join(HERE, "peer_process.py"), method, bp, tp, str(rank), out]
    if once:
        cmd.append("--once-per-shape")
        if shape_secs:
            skip = os.path.join(tmp, "timed-shapes.json")
            with open(skip, "w") as f:
                json.dump(sorted(shape_secs), f)
            cmd += ["--skip-shapes", skip]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env=child_env())
    whole = time.time() - t0
    with open(out) as f:
        r = json.load(f)
    to_file = r["end"] - t0
    if once:
        cache = shape_secs if shape_secs is not None else {}
        for shape, v in r["per_shape"].items():
            if v["seconds"] is not None:
                cache[shape] = v["seconds"]
        whole = to_file = (r["first_layer"] - t0) + sum(
            v["count"] * cache[shape] for shape, v in r["per_shape"].items())
    return whole, file_errors(bp, tp, out + ".safetensors"), to_file


def ratios(errors: dict[str, float], optimum: dict[str, float]) -> tuple[float, float]:
    rs = [errors[k] / optimum[k] for k in errors if k in optimum and optimum[k] > 0]
    if not rs:                  # every shape's full SVD timed earlier in the run
        return float("nan"), float("nan")
    return statistics.median(rs), max(rs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from: " + ", ".join(KINDS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the layer counts")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of ours and KJ's")
    ap.add_argument("--full-svd", choices=("per-shape", "all", "skip"), default="per-shape")
    ap.add_argument("--json", default="", help="write the rows here too")
    a = ap.parse_args()
    rows = []
    shape_secs: dict[str, float] = {}     # full SVD seconds per shape, timed once per run
    warm_bytecode()
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[:3]}", flush=True)
    for kind in a.kinds.split(","):
        _, _, decay, noise = KINDS[kind]
        layers = kind_layers(kind, a.scale)
        n = sum(1 for s in layers if len(s.shape) > 1)
        params = sum(int(torch_numel(s.shape)) for s in layers)
        bp, tp = write_pair(layers, decay=decay, noise=noise)
        with tempfile.TemporaryDirectory() as tmp:
            t_exact, optimum = run_ours(bp, tp, a.rank, "svd_linalg", tmp)
            low, kj = [], []
            for _ in range(a.repeat):
                low.append(run_ours(bp, tp, a.rank, "svd_lowrank", tmp))
                kj.append(run_peer("kj", bp, tp, a.rank, tmp, False))
            full = None if a.full_svd == "skip" else run_peer(
                "full", bp, tp, a.rank, tmp, a.full_svd == "per-shape", shape_secs)
        t_low = statistics.median(t for t, _ in low)
        t_kj = statistics.median(t for t, _, _ in kj)
        t_kj_file = statistics.median(t for _, _, t in kj)
        row = {"kind": kind, "matrices": n, "params_m": round(params / 1e6),
               "lowrank_s": [round(t, 2) for t, _ in low], "kj_s": [round(t, 2) for t, _, _ in kj],
               "kj_to_file_s": [round(t, 2) for _, _, t in kj],
               "exact_s": round(t_exact, 2), "lowrank_err": ratios(low[0][1], optimum),
               "kj_err": ratios(kj[0][1], optimum), "kj_over_lowrank": round(t_kj / t_low, 2),
               "kj_to_file_over_lowrank": round(t_kj_file / t_low, 2)}
        if full is not None:
            row.update(full_s=round(full[0], 1), full_err=ratios(full[1], optimum),
                       full_over_lowrank=round(full[0] / t_low, 1),
                       full_over_exact=round(full[0] / t_exact, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average at end: {f.read().split()[:3]}", flush=True)
    print("\n| kind | matrices / params | full SVD | ours exact | KJ default | ours lowrank | "
          "lowrank vs full | vs KJ (KJ to its file write) | exact vs full | "
          "error / optimum: ours lowrank | KJ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full_s = f"{r['full_s']} s" if "full_s" in r else "-"
        print(f"| {r['kind']} | {r['matrices']} / {r['params_m']}M | {full_s} | {r['exact_s']} s | "
              f"{statistics.median(r['kj_s']):.2f} s | {statistics.median(r['lowrank_s']):.2f} s | "
              f"{r.get('full_over_lowrank', '-')}x | {r['kj_over_lowrank']}x "
              f"({r['kj_to_file_over_lowrank']}x) | "
              f"{r.get('full_over_exact', '-')}x | {r['lowrank_err'][0]:.5f}, {r['lowrank_err'][1]:.5f} | "
              f"{r['kj_err'][0]:.5f}, {r['kj_err'][1]:.5f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
