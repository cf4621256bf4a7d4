#!/usr/bin/env python3
"""Soak a running ComfyUI server: many LoraExtract / LoraExtractV2 runs in a row, in one process.

    python scripts/server_soak.py --server http://127.0.0.1:8188 --comfy-root PATH \
        [--runs 50] [--load 1] [--pid SERVER_PID] [--model tiny_sd15] [--json OUT.json]

Run 1 is V1 (LoraExtract); then V2 runs cycle through every ``vram_usage_mode`` with batch sizes
1 and 8 (and a V1 run every tenth), all with the same extraction settings (rank 16,
adaptive_energy 0.9, fp16). ``--load N`` starts N background processes doing matrix products, so
the runs share the CPU as on a busy machine. Each run must finish (``--timeout`` per run), and
each file must hold V1's keys with V1's values (fp16 rounding apart). With ``--pid`` the
server's resident memory is read after every run; the report gives the first and last.
Exit status 0 when every run passed, 1 otherwise. Needs torch and safetensors (for the
comparison) in the Python that runs it; the server can be anywhere it can reach.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

MODES = ("conservative", "balanced", "aggressive", "maximum")
LOAD_CODE = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
             "while True:\n    a = torch.tanh(a @ a / 512)\n")


def call(server: str, path: str, body: object | None = None, timeout: float = 30) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.rstrip("/") + path, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def run_prompt(server: str, prompt: dict, timeout: float) -> tuple[str, list]:
    pid = call(server, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = call(server, f"/history/{pid}")
        if hist and pid in hist:
            status = hist[pid]["status"]
            return status["status_str"], status.get("messages", [])
        time.sleep(0.2)
    call(server, "/interrupt", {})
    return "timeout", []


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def schedule(runs: int) -> list[dict]:
    """Run 1 and every tenth: V1; the others cycle modes x batch sizes 1 and 8."""
    combos = [(m, b) for m in MODES for b in (1, 8)]
    out, k = [], 0
    for i in range(runs):
        if i % 10 == 0:
            out.append({"node": "LoraExtract"})
        else:
            mode, batch = combos[k % len(combos)]
            k += 1
            out.append({"node": "LoraExtractV2", "vram_usage_mode": mode, "batch_size": batch})
    return out


def workflow(model: str, prefix: str, run: dict) -> dict:
    inputs = {
        "finetuned_model": ["1", 0], "original_model": ["2", 0], "filename_prefix": prefix,
        "rank": 16, "lora_type": "adaptive_energy", "algorithm": "svd_linalg", "lowrank_iters": 7,
        "output_dtype": "fp16", "bias_diff": True, "adaptive_param": 0.9, "clamp_quantile": True,
        "conv_rank": 0, "alpha": 0.0, "key_style": "comfy", "save_to": "output",
        "text_encoder_rank": 0, "target_size_mb": 0.0, "size_objective": "mean"}
    if run["node"] == "LoraExtractV2":
        inputs.update({"vram_usage_mode": run["vram_usage_mode"], "blocks_in_gpu": 10,
                       "batch_size": run["batch_size"], "prefetch_ahead": 2,
                       "memory_threshold": 0.85, "debug_mode": True})
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{model}_tuned.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{model}_base.safetensors",
                                                     "weight_dtype": "default"}},
        "3": {"class_type": run["node"], "inputs": inputs},
    }


def same_as(reference: dict, got: dict) -> str | None:
    """None when ``got`` has the reference's keys, in order, and its values; else why not."""
    import torch

    if list(reference) != list(got):
        return f"keys differ ({len(reference)} vs {len(got)})"
    for k, t in reference.items():
        if t.shape != got[k].shape:
            return f"{k}: shape {tuple(got[k].shape)} vs {tuple(t.shape)}"
        a, b = t.float(), got[k].float()
        if k.endswith(".lora_up.weight") or k.endswith(".lora_down.weight"):
            continue   # a factor's sign is free; the product below is what must match
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-3):
            return f"{k}: max difference {float((a - b).abs().max()):.3g}"
    for k in reference:
        if k.endswith(".lora_up.weight"):
            down = k.replace(".lora_up.", ".lora_down.")
            pa = reference[k].float().flatten(1) @ reference[down].float().flatten(1)
            pb = got[k].float().flatten(1) @ got[down].float().flatten(1)
            scale = float(pa.abs().max()) or 1.0
            if float((pa - pb).abs().max()) > 2e-2 * scale:
                return f"{k}: up @ down differs by {float((pa - pb).abs().max()):.3g}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--comfy-root", required=True, help="the server's ComfyUI folder (output/)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--model", default="tiny_sd15")
    p.add_argument("--load", type=int, default=1, help="background matmul processes")
    p.add_argument("--pid", type=int, default=None, help="the server's process id (RSS)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json", help="write the per-run results here")
    a = p.parse_args(argv)
    from safetensors.torch import load_file

    tag = f"soak_{int(time.time())}"
    loaders = [subprocess.Popen([sys.executable, "-c", LOAD_CODE]) for _ in range(a.load)]
    results: list[dict] = []
    reference: dict | None = None
    t0 = time.perf_counter()
    try:
        for i, run in enumerate(schedule(a.runs)):
            prefix = f"{tag}/run{i:03d}"
            t = time.perf_counter()
            status, messages = run_prompt(a.server, workflow(a.model, prefix, run), a.timeout)
            files = glob.glob(os.path.join(a.comfy_root, "output", tag, f"run{i:03d}*.safetensors"))
            row = {**run, "run": i + 1, "status": status, "seconds": time.perf_counter() - t,
                   "rss_mib": rss_mib(a.pid), "files": len(files), "mismatch": None}
            if status != "success" or len(files) != 1:
                row["mismatch"] = f"status {status}, {len(files)} files: {json.dumps(messages)[-600:]}"
            else:
                got = load_file(files[0])
                if reference is None:
                    reference = got
                row["mismatch"] = same_as(reference, got)
            results.append(row)
            print(f"run {i + 1:3d} {run['node']:13s} {run.get('vram_usage_mode', '-'):12s} "
                  f"batch {run.get('batch_size', '-')!s:2s} {status:8s} {row['seconds']:6.1f} s "
                  f"RSS {row['rss_mib'] or 0:7.1f} MiB  {row['mismatch'] or 'same as V1'}",
                  flush=True)
    finally:
        for proc in loaders:
            proc.terminate()
            proc.wait()
    bad = [r for r in results if r["mismatch"]]
    rss = [r["rss_mib"] for r in results if r["rss_mib"] is not None]
    print(f"{len(results)} runs in {time.perf_counter() - t0:.0f} s under {a.load} background "
          f"load process(es): {len(results) - len(bad)} finished with V1's file, {len(bad)} not"
          + (f"; server RSS after run 1 {rss[0]:.0f} MiB, after run {len(rss)} {rss[-1]:.0f} MiB, "
             f"max {max(rss):.0f} MiB" if rss else ""))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
