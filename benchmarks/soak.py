"""Soak: repeated extractions in one process (as a ComfyUI server runs them) must not grow.

    python benchmarks/soak.py [--keys 2000] [--runs 3] [--width 16] [--v2]

Writes a generated base/fine-tuned pair with ``--keys`` weight matrices (plus a bias for every
fourth one) to a temporary folder, then extracts it ``--runs`` times from the files in this
process. For each run it reports the peak resident memory (VmHWM, reset before the run through
/proc/self/clear_refs; a 2 ms VmRSS sampler where that is not allowed), the resident memory
after the run, the open file descriptors and the prefetch threads still alive. Linux only.
The baseline is the first run of the same process: later peaks should match it within noise.

``--v2``: run 1 and every tenth run are V1; the others cycle LoRA Extract V2 through every
``vram_usage_mode`` with batch sizes 1 and 8, and every file must equal run 1's (V1's) file
(as the command line's ``--v2`` runs them, in one process).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_to_file
from lora_extract.extract.writer import save_safetensors_atomic
from lora_extract.memory.planner import MODES, MemoryOptions
from lora_extract.memory.streamed_extract import extract_to_file_streamed

MIB = 2**20


@dataclass
class RunStats:
    peak_rss: int          # bytes
    rss_after: int         # bytes, after the run and a gc
    open_fds: int
    fds_on_inputs: int     # descriptors still pointing at the model files
    prefetch_threads: int
    seconds: float


@dataclass
class SoakResult:
    keys: int
    runs: list[RunStats] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"soak: {self.keys} weight keys, {len(self.runs)} runs in one process"]
        for i, r in enumerate(self.runs, 1):
            lines.append(f"run {i}: peak {r.peak_rss / MIB:.1f} MiB, after {r.rss_after / MIB:.1f} MiB, "
                         f"fds {r.open_fds} ({r.fds_on_inputs} on inputs), prefetch threads "
                         f"{r.prefetch_threads}, {r.seconds:.2f} s")
        base = self.runs[0]
        lines.append("peak vs run 1: " + ", ".join(f"{r.peak_rss / base.peak_rss:.3f}" for r in self.runs))
        return "\n".join(lines)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _Sampler:
    """Fallback peak tracker where clear_refs cannot be written."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.002)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("VmRSS"))


def _fds_on(paths: set[str]) -> tuple[int, int]:
    fds = os.listdir("/proc/self/fd")
    on = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in paths:
                on += 1
        except OSError:
            pass  # the descriptor listdir itself used is gone already
    return len(fds), on


def write_soak_pair(folder: str, keys: int = 2000, width: int = 16, seed: int = 0) -> tuple[str, str]:
    """A pair with ``keys`` weight matrices of ``width`` x ``width`` and a bias every fourth one."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    for i in range(keys):
        k = f"diffusion_model.blocks.{i // 4}.layers.{i % 4}"
        w = torch.randn(width, width, generator=g)
        base[k + ".weight"] = w
        tuned[k + ".weight"] = w + 0.01 * torch.randn(width, 2, generator=g) @ torch.randn(2, width, generator=g)
        if i % 4 == 0:
            b = torch.randn(width, generator=g)
            base[k + ".bias"] = b
            tuned[k + ".bias"] = b + 0.01
    bp, tp = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    save_safetensors_atomic(base, bp, overwrite=True)
    save_safetensors_atomic(tuned, tp, overwrite=True)
    return bp, tp


def v2_schedule(runs: int) -> list[MemoryOptions | None]:
    """None (V1) for run 1 and every tenth; otherwise every mode with batch sizes 1 and 8."""
    combos = [MemoryOptions(mode=m, batch_size=b) for m in MODES for b in (1, 8)]
    return [None if i % 10 == 0 else combos[(i - 1 - i // 10) % len(combos)] for i in range(runs)]


def run_soak(folder: str, keys: int = 2000, runs: int = 3, width: int = 16,
             cfg: ExtractConfig | None = None, v2: bool = False) -> SoakResult:
    cfg = cfg or ExtractConfig(rank=4)
    plan = v2_schedule(runs) if v2 else [None] * runs
    reference: dict[str, torch.Tensor] | None = None
    bp, tp = write_soak_pair(folder, keys, width)
    inputs = {os.path.realpath(bp), os.path.realpath(tp)}
    result = SoakResult(keys=keys)
    for i in range(runs):
        gc.collect()
        out = os.path.join(folder, f"lora_{i}.safetensors")
        t0 = time.perf_counter()
        if _reset_peak():
            sampler = None
            _run_once(bp, tp, cfg, out, plan[i])
            peak = _status_kib("VmHWM")
        else:
            with _Sampler() as sampler:
                _run_once(bp, tp, cfg, out, plan[i])
            peak = sampler.peak
        seconds = time.perf_counter() - t0
        gc.collect()
        n_fds, on_inputs = _fds_on(inputs)
        threads = sum(t.name.startswith("lora-extract") for t in threading.enumerate())
        result.runs.append(RunStats(peak * 1024, _status_kib("VmRSS") * 1024, n_fds, on_inputs,
                                    threads, seconds))
        if v2:
            got = load_file(out)
            reference = reference if reference is not None else got
            _assert_same_file(reference, got, i + 1)
        os.unlink(out)
    return result


def _run_once(bp: str, tp: str, cfg: ExtractConfig, out: str,
              v2: MemoryOptions | None = None) -> None:
    # As a server would: open, extract, drop. The first source is closed explicitly, the
    # second only dropped, so both ways of letting go of a file are checked.
    with SafetensorsSource(bp) as base:
        if v2 is None:
            report = extract_to_file(base, SafetensorsSource(tp), cfg, out)
        else:
            report, _ = extract_to_file_streamed(base, SafetensorsSource(tp), cfg, v2, out)
    assert report.summary().lora > 0


def _assert_same_file(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                      run: int) -> None:
    assert list(reference) == list(got), f"run {run}: keys differ from V1's file"
    for k, t in reference.items():
        torch.testing.assert_close(got[k].float(), t.float(), rtol=2e-3, atol=2e-4,
                                   msg=lambda m, k=k: f"run {run}, {k}: {m}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--v2", action="store_true", help="cycle V2 modes and batch sizes 1 and 8; "
                    "every file must equal V1's")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        fds_before = len(os.listdir("/proc/self/fd"))
        res = run_soak(d, a.keys, a.runs, a.width, v2=a.v2)
        print(res.format())
        print(f"open fds before the first run: {fds_before}")


if __name__ == "__main__":
    main()
