"""Randomized stress of the V2 streaming machinery, with a watchdog (used by
tests/memory/test_stream_stress.py and runnable alone for long runs).

Each trial runs the real ``extract_lora_streamed`` (planner, staging pool, streamer, prefetcher,
rolling or batch-barrier consumer, layer store) on a small generated pair with random layer
sizes, a random mode, batch size and read-ahead, a random staging capacity (the planner's own,
or a tighter or looser one), the host or the asynchronous-copy (CUDA-style) path, resident
cache hits, random delays in the reader and the workers, and sometimes an injected exception
in either. A trial passes when it ends before the watchdog, with V1's result or the injected
exception, with every staging buffer back in its pool and no thread of the run left.

    python tests/support/stream_stress.py --runs 5000 [--seed 0] [--capacity planner|random]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

import lora_extract.memory.streamed_extract as streamed
from lora_extract.extract import ExtractConfig, extract_lora
from lora_extract.extract.sources import SafetensorsSource, StateDictSource
from lora_extract.extract.synthetic import LayerSpec, make_pair
from lora_extract.extract.writer import save_safetensors_atomic
from lora_extract.memory import batch_decompose
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MODES, MemoryOptions

WATCHDOG_S = 20.0


class InjectedFault(Exception):
    """Raised on purpose by a trial's reader or worker."""


@dataclass
class Faults:
    """What the current trial injects (shared by the sources and the worker wrapper)."""

    rng: random.Random = field(default_factory=random.Random)
    delay_p: float = 0.0
    reader_fail_p: float = 0.0
    worker_fail_p: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _roll(self, p: float) -> bool:
        with self.lock:
            return self.rng.random() < p

    def maybe(self, fail_p: float, where: str) -> None:
        if self._roll(self.delay_p):
            with self.lock:
                pause = self.rng.random() * 0.003
            time.sleep(pause)
        if self._roll(fail_p):
            raise InjectedFault(where)


FAULTS = Faults()


class FaultyDict(StateDictSource):
    def get(self, key, device="cpu", dtype=None):
        FAULTS.maybe(FAULTS.reader_fail_p, f"reader at {key}")
        return super().get(key, device, dtype)


class FaultyFile(SafetensorsSource):
    def get(self, key, device="cpu", dtype=None):
        FAULTS.maybe(FAULTS.reader_fail_p, f"reader at {key}")
        return super().get(key, device, dtype)

    def read_elements(self, key, lo, hi, buf):
        if lo == 0:
            FAULTS.maybe(FAULTS.reader_fail_p, f"reader at {key}")
        return super().read_elements(key, lo, hi, buf)

    def read_into(self, key, buf):
        FAULTS.maybe(FAULTS.reader_fail_p, f"reader at {key}")
        return super().read_into(key, buf)


class PassThroughStreams:
    """The asynchronous-copy protocol on the CPU: every call runs synchronously."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def on_side(self):
        return nullcontext()

    def to_device(self, pinned: torch.Tensor) -> torch.Tensor:
        return pinned.clone()

    def mark(self) -> object:
        return object()

    def wait_host(self, event: object) -> None:
        pass

    def keep_for_compute(self, t: torch.Tensor) -> None:
        pass

    def compute_waits(self, event: object) -> None:
        pass


def _layers(rng: random.Random) -> list[LayerSpec]:
    """Random sizes, so batches mix large and small layers and pool buffers get reused."""
    specs = []
    for i in range(rng.randint(3, 14)):
        key = f"diffusion_model.input_blocks.{i}.1.proj"
        big = rng.random() < 0.3
        rows = rng.randint(16, 48) if big else rng.randint(2, 12)
        cols = rng.randint(16, 48) if big else rng.randint(2, 12)
        shape = (rows, cols, 1, 1) if rng.random() < 0.2 else (rows, cols)
        rank = 0 if rng.random() < 0.15 else rng.randint(1, 4)      # 0: no difference
        specs.append(LayerSpec(f"{key}.weight", shape, rank))
        if rng.random() < 0.4:
            specs.append(LayerSpec(f"{key}.bias", (rows,), 0 if rng.random() < 0.5 else 1))
    return specs


@dataclass
class Model:
    base: object
    tuned: object
    cfg: ExtractConfig
    v1: object
    cache: ResidentCache


def make_models(folder: str, count: int, seed: int) -> list[Model]:
    """``count`` generated pairs (half of them in files) and V1's result for each."""
    rng = random.Random(seed)
    models = []
    for m in range(count):
        base_sd, tuned_sd = make_pair(_layers(rng), seed=seed * 100 + m)
        tuned_sd["diffusion_model.only_in_tuned.weight"] = torch.ones(3, 3)   # a skipped key
        cfg = ExtractConfig(rank=rng.randint(1, 4), output_dtype="fp32",
                            lora_type=rng.choice(["standard", "adaptive_energy", "full"]),
                            adaptive_param=0.9)
        if m % 2:
            bp, tp = f"{folder}/base{m}.safetensors", f"{folder}/tuned{m}.safetensors"
            save_safetensors_atomic(base_sd, bp, overwrite=True)
            save_safetensors_atomic(tuned_sd, tp, overwrite=True)
            base, tuned = FaultyFile(bp), FaultyFile(tp)
        else:
            base, tuned = FaultyDict(base_sd, "base"), FaultyDict(tuned_sd, "tuned")
        models.append(Model(base, tuned, cfg, extract_lora(base, tuned, cfg), ResidentCache()))
    return models


@dataclass
class Trial:
    seed: int
    opts: MemoryOptions
    capacity: str
    streams: bool
    probe: bool
    faults: tuple[float, float, float]


def _pick(seed: int, capacity_mode: str, failures: bool = True) -> Trial:
    rng = random.Random(seed)
    opts = MemoryOptions(mode=rng.choice(list(MODES)), batch_size=rng.randint(1, 8),
                         prefetch_ahead=rng.choice([0, 1, 2, 2, 3, 4, 8]))
    capacity = "planner" if capacity_mode == "planner" else rng.choice(
        ["planner", "planner", "one", "tiny", "double", "batch"])
    failing = rng.random() < 0.25 and failures
    faults = (rng.choice([0.0, 0.2, 0.6]),
              0.04 if failing and rng.random() < 0.5 else 0.0,
              0.05 if failing else 0.0)
    return Trial(seed, opts, capacity, rng.random() < 0.3, rng.random() < 0.5, faults)


@contextmanager
def _patched(trial: Trial, pools: list):
    """Record the run's pools; set the staging capacity; make workers slow or failing."""
    real_plan, real_pool, real_extract = (streamed.plan_memory, streamed.StagingPool,
                                          batch_decompose.extract_matrix)
    rng = random.Random(trial.seed + 1)

    def plan(blocks, largest, free, opts):
        p = real_plan(blocks, largest, free, opts)
        factor = {"planner": None, "one": 1, "tiny": 0.5, "double": 2,
                  "batch": p.batch_size}[trial.capacity]
        if factor is not None:
            p.staging_bytes = max(1, int(largest * factor))
            p.max_batch_bytes = max(largest, int(largest * rng.choice([1, 2, 4])))
        return p

    class RecordedPool(real_pool):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pools.append(self)

    def extract(*a, **k):
        FAULTS.maybe(FAULTS.worker_fail_p, "worker")
        return real_extract(*a, **k)

    streamed.plan_memory, streamed.StagingPool, batch_decompose.extract_matrix = plan, RecordedPool, extract
    try:
        yield
    finally:
        streamed.plan_memory, streamed.StagingPool, batch_decompose.extract_matrix = (
            real_plan, real_pool, real_extract)


def _buffers_out(pool) -> int:
    return pool.buffers_out if hasattr(pool, "buffers_out") else pool._out


def _run_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lora-extract")]


def _same(v1, v2) -> None:
    assert list(v1.tensors) == list(v2.tensors), "keys or their order differ from V1"
    for k, t in v1.tensors.items():
        torch.testing.assert_close(v2.tensors[k], t, rtol=2e-3, atol=2e-4, msg=k)
    r1 = {r.key: (r.status, r.rank, r.reason) for r in v1.report.layers}
    r2 = {r.key: (r.status, r.rank, r.reason) for r in v2.report.layers}
    assert r1 == r2, "per-layer statuses or ranks differ from V1"


def _stacks() -> str:
    frames = sys._current_frames()
    out = []
    for t in threading.enumerate():
        frame = frames.get(t.ident or -1)
        if frame is not None:
            out.append(f"--- {t.name}\n" + "".join(traceback.format_stack(frame, limit=8)))
    return "\n".join(out)


class Hang(AssertionError):
    pass


def run_trial(models: list[Model], seed: int, capacity_mode: str = "random",
              failures: bool = True) -> str:
    """One trial; returns "ok" or "fault"; raises ``Hang`` or an assertion on failure."""
    trial = _pick(seed, capacity_mode, failures)
    model = models[seed % len(models)]
    FAULTS.rng.seed(seed + 2)
    FAULTS.delay_p, FAULTS.reader_fail_p, FAULTS.worker_fail_p = trial.faults
    pools: list = []
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            with _patched(trial, pools):
                outcome["result"] = streamed.extract_lora_streamed(
                    model.base, model.tuned, model.cfg, trial.opts, cache=model.cache,
                    probe=(lambda: (1 << 30, 1 << 31)) if trial.probe else (lambda: None),
                    streams=PassThroughStreams() if trial.streams else None)
        except BaseException as e:  # noqa: BLE001 - judged by the caller
            outcome["error"] = e

    worker = threading.Thread(target=body, name="stress-trial", daemon=True)
    worker.start()
    worker.join(WATCHDOG_S)
    if worker.is_alive():
        raise Hang(f"trial {seed} ({trial}) did not finish in {WATCHDOG_S:.0f} s; threads:\n"
                   f"{_stacks()}")
    # Threads and buffers go back on the way out; a worker finishing an abandoned layer may
    # need a moment.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and (
            _run_threads() or any(_buffers_out(p) for p in pools)):
        time.sleep(0.01)
    assert not _run_threads(), f"trial {seed} ({trial}): threads left: {_run_threads()}"
    assert all(_buffers_out(p) == 0 for p in pools), (
        f"trial {seed} ({trial}): buffers not given back: {[_buffers_out(p) for p in pools]}")
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, InjectedFault):
            return "fault"
        raise AssertionError(f"trial {seed} ({trial}): unexpected {err!r}") from err
    _same(model.v1, outcome["result"].result)
    return "ok"


def main() -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--capacity", choices=("random", "planner"), default="random",
                   help="planner: only the capacities the planner chooses")
    p.add_argument("--no-failures", action="store_true",
                   help="delays only, no injected exceptions")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = make_models(folder, a.models, a.seed)
        t0 = time.perf_counter()
        counts = {"ok": 0, "fault": 0}
        for i in range(a.runs):
            try:
                counts[run_trial(models, a.seed * 1_000_000 + i, a.capacity,
                                    not a.no_failures)] += 1
            except Hang as e:
                print(f"HANG after {i + 1} runs ({time.perf_counter() - t0:.1f} s):\n{e}")
                return 1
        print(f"{a.runs} runs in {time.perf_counter() - t0:.1f} s: {counts['ok']} equal to V1, "
              f"{counts['fault']} stopped by an injected fault; no hang, every buffer back")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
