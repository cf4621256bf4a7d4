"""What GGUF input costs: ``lora-extract extract`` (rank 32, svd_lowrank) on one generated
base/fine-tune pair stored as bf16 safetensors and as GGUF (Q8_0, Q6_K, ...), each run a whole
fresh process, formats interleaved over the repeats so that a change in machine load hits all
of them alike. The GGUF files hold the bf16 values quantized (ComfyUI-GGUF's conversion rules).

Per format: the median wall time of the process, its CPU time (user + system), the time inside
the extraction (no interpreter start-up), each as a ratio to bf16, and the peak resident
memory split into anonymous memory (what the run holds) and file pages (the mapped model
files: reclaimable page cache) as sampled inside the process every 10 ms.

    python benchmarks/gguf_speed.py --out DIR --layers 16 --width 2048 --types Q8_0 Q6_K --repeats 3

The pair is written once into ``DIR`` and reused when it is already there (same size).
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


def make_pair(out_dir: str, layers: int, width: int, types: list[str], seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write (or reuse) the bf16 pair and its GGUF versions; returns format -> (base, tuned)."""
    import torch
    from gguf_files import write_gguf
    from safetensors.torch import save_file

    tag = f"{layers}x{width}"
    paths = {"bf16": tuple(os.path.join(out_dir, f"{m}-{tag}-bf16.safetensors") for m in ("base", "tuned"))}
    for t in types:
        paths[t] = tuple(os.path.join(out_dir, f"{m}-{tag}-{t}.gguf") for m in ("base", "tuned"))
    if all(os.path.exists(p) for pair in paths.values() for p in pair):
        return paths
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i in range(layers):
        w = torch.randn(width, width, generator=g) * 0.02
        delta = (torch.randn(width, 48, generator=g) @ torch.randn(48, width, generator=g)) * 1e-3
        base[f"blocks.{i}.attn.q.weight"] = w.to(torch.bfloat16)
        tuned[f"blocks.{i}.attn.q.weight"] = (w + delta).to(torch.bfloat16)
        del w, delta
    for sd, (bp, tp) in ((base, paths["bf16"]), (tuned, paths["bf16"])):
        save_file(sd, bp if sd is base else tp)
    for t in types:
        for sd, p in ((base, paths[t][0]), (tuned, paths[t][1])):
            write_gguf(p, ((k, v.float().numpy()) for k, v in sd.items()), t)
    return paths


def child(base: str, tuned: str, out: str, rank: int) -> None:
    """One extraction in this process; prints a JSON line with its time and memory peaks."""
    from rss import RssPeaks

    from lora_extract.cli import main as cli

    with RssPeaks() as mem:
        t0 = time.perf_counter()
        rc = cli(["extract", base, tuned, "-o", out, "--rank", str(rank), "--algorithm",
                  "svd_lowrank", "--overwrite"])
        seconds = time.perf_counter() - t0
    print(json.dumps({"rc": rc, "extract_s": seconds, "start_kib": mem.start_kib,
                      "peak_kib": mem.peak_kib}))


def run_once(base: str, tuned: str, out: str, rank: int) -> dict[str, float]:
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", base,
                                 tuned, out, "--rank", str(rank)], stdout=log, stderr=log, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status  # reaped here; keeps Popen from waiting again
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if status != 0:
        raise RuntimeError(f"extraction of {base} failed (status {status}):\n{text[-2000:]}")
    got = json.loads(text.strip().splitlines()[-1])
    if got["rc"] != 0:
        raise RuntimeError(f"extraction of {base} returned {got['rc']}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "extract_s": got["extract_s"],
            "anon_mib": got["peak_kib"]["RssAnon"] / 1024, "file_mib": got["peak_kib"]["RssFile"] / 1024,
            "rss_mib": got["peak_kib"]["VmRSS"] / 1024, "start_anon_mib": got["start_kib"]["RssAnon"] / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for the generated pair and the LoRAs")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--child", nargs=3, metavar=("BASE", "TUNED", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.rank)
        return
    if not a.out:
        ap.error("--out is needed")
    os.makedirs(a.out, exist_ok=True)
    paths = make_pair(a.out, a.layers, a.width, a.types)
    formats = ["bf16", *a.types]
    runs: dict[str, list[dict[str, float]]] = {f: [] for f in formats}
    for r in range(a.repeats):
        order = formats[r % len(formats):] + formats[:r % len(formats)]
        for f in order:
            base, tuned = paths[f]
            runs[f].append(run_once(base, tuned, os.path.join(a.out, f"lora-{f}.safetensors"), a.rank))
            print(f"repeat {r + 1} {f}: {runs[f][-1]}", file=sys.stderr, flush=True)
    size_mib = os.path.getsize(paths["bf16"][0]) / 2**20
    print(f"pair: {a.layers} layers of {a.width} x {a.width}, {size_mib:.0f} MiB per model in bf16; "
          f"rank {a.rank} svd_lowrank; median of {a.repeats} runs per format")
    print(f"{'format':8s} {'wall s':>8s} {'ratio':>6s} {'cpu s':>8s} {'ratio':>6s} {'extract s':>9s} "
          f"{'ratio':>6s} {'anon MiB':>9s} {'file MiB':>9s} {'rss MiB':>8s}")
    med = {f: {k: statistics.median(x[k] for x in runs[f]) for k in runs[f][0]} for f in formats}
    peak = {f: {k: max(x[k] for x in runs[f]) for k in runs[f][0]} for f in formats}
    for f in formats:
        m, b = med[f], med["bf16"]
        print(f"{f:8s} {m['wall_s']:8.2f} {m['wall_s'] / b['wall_s']:6.2f} {m['cpu_s']:8.2f} "
              f"{m['cpu_s'] / b['cpu_s']:6.2f} {m['extract_s']:9.2f} {m['extract_s'] / b['extract_s']:6.2f} "
              f"{peak[f]['anon_mib']:9.0f} {peak[f]['file_mib']:9.0f} {peak[f]['rss_mib']:8.0f}")


if __name__ == "__main__":
    main()
