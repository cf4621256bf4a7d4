"""The V2 mechanics on the CPU: staging pool, resident cache, threshold, out-of-memory, interrupt."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import LayerSpec, demo_layers, make_pair
from lora_extract.memory import batch_decompose
from lora_extract.memory.buffers import PoolClosed, StagingPool
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed, extract_to_file_streamed
from tests.support.fault_injection import fail_on_call

GIB = 2**30


class CountingSource(StateDictSource):
    """A state-dict source that counts reads per key."""

    def __init__(self, tensors, name: str) -> None:
        super().__init__(tensors, name)
        self.reads: dict[str, int] = {}

    def get(self, key, device="cpu", dtype=None):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key, device, dtype)


def _layers() -> list[LayerSpec]:
    return demo_layers(32) + [
        LayerSpec("diffusion_model.output_blocks.2.1.proj.weight", (32, 32), 8),
        LayerSpec("diffusion_model.middle_block.0.proj.weight", (32, 32), 8),
    ]


@pytest.fixture
def sources():
    base, tuned = make_pair(_layers(), seed=4)
    return CountingSource(base, "base"), CountingSource(tuned, "tuned")


def _same_tensors(a, b) -> None:
    assert list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k].float(), a.tensors[k].float(), rtol=2e-3, atol=2e-4)


class _WaitSignal(threading.Condition):
    """The pool's condition variable, setting ``waiting`` whenever a thread starts to wait on it:
    a wait is then observed as an event, not guessed from a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


LIVENESS_S = 60   # only bounds a hang; never decides a result


def test_pool_reuses_buffers_and_bounds_memory() -> None:
    pool = StagingPool(1000)
    cond = pool._cond = _WaitSignal()
    a = pool.acquire(400)
    b = pool.acquire(500)
    got: list[torch.Tensor] = []
    done = threading.Event()

    def third() -> None:
        got.append(pool.acquire(300))
        done.set()
    t = threading.Thread(target=third)
    t.start()
    while not (cond.waiting.is_set() or done.is_set()):
        cond.waiting.wait(0.01)
    assert cond.waiting.is_set() and not got     # 400 + 500 + 300 > 1000: it waits for a release
    pool.release(a)
    assert done.wait(LIVENESS_S)
    assert got and got[0] is a                   # the released buffer is reused, not a new one
    pool.release(b)
    pool.release(got[0])
    big = pool.acquire(5000)                     # larger than the cap: runs alone, never waits
    assert big.numel() == 5000
    waiter_error: list[BaseException] = []
    cond.waiting.clear()

    def wait_forever() -> None:
        try:
            pool.acquire(900)                    # cannot fit beside the 5000 one
        except PoolClosed as e:
            waiter_error.append(e)
    t = threading.Thread(target=wait_forever)
    t.start()
    assert cond.waiting.wait(LIVENESS_S)         # it is waiting ...
    pool.close()                                 # ... and the end of a run wakes and fails it
    t.join(LIVENESS_S)
    assert not t.is_alive() and waiter_error
    with pytest.raises(PoolClosed):
        pool.acquire(1)


def test_an_oversized_layer_waits_while_reused_buffers_are_out() -> None:
    """"Alone" means no buffer out, counting reused ones: with one reused buffer still held,
    a layer larger than the cap waits for it (the pool's memory bound holds)."""
    pool = StagingPool(1000)
    a, b = pool.acquire(400), pool.acquire(500)
    pool.release(a)
    pool.release(b)
    x, y = pool.acquire(400), pool.acquire(500)      # both reused
    assert x is a and y is b
    pool.release(x)                                  # y is still out
    cond = pool._cond = _WaitSignal()
    got: list[torch.Tensor] = []
    done = threading.Event()

    def big() -> None:
        got.append(pool.acquire(5000))
        done.set()
    t = threading.Thread(target=big)
    t.start()
    while not (cond.waiting.is_set() or done.is_set()):
        cond.waiting.wait(0.01)
    assert cond.waiting.is_set() and not got
    pool.release(y)
    assert done.wait(LIVENESS_S) and got[0].numel() == 5000
    t.join(LIVENESS_S)


def test_pool_never_waits_on_nothing() -> None:
    pool = StagingPool(100)
    assert pool.acquire(10_000).numel() == 10_000
    assert pool.peak_bytes == 10_000


def test_resident_blocks_are_not_read_again(sources) -> None:
    base, tuned = sources
    cache = ResidentCache()
    cfg = ExtractConfig(rank=4)
    probe = lambda: (8 * GIB, 16 * GIB)  # noqa: E731 - a device with room, on the CPU
    opts = MemoryOptions(mode="balanced", blocks_in_gpu=2)
    first = extract_lora_streamed(base, tuned, cfg, opts, probe=probe, cache=cache)
    assert first.memory.plan.resident == ["middle_block", "output_blocks.2"]
    kept = {"diffusion_model.middle_block.0.proj.weight", "diffusion_model.middle_block.1.proj_out.weight",
            "diffusion_model.output_blocks.2.1.proj.weight"}
    assert first.memory.cached_layers == len(kept) and first.memory.cache_hits == 0
    reads_before = dict(tuned.reads)
    second = extract_lora_streamed(base, tuned, ExtractConfig(rank=6), opts, probe=probe, cache=cache)
    assert second.memory.cache_hits == len(kept)
    for key, n in tuned.reads.items():
        assert n - reads_before.get(key, 0) == (0 if key in kept else 1), key
    _same_tensors(extract_lora(base, tuned, ExtractConfig(rank=6)), second.result)
    # Other inputs: the cache is emptied for them.
    other_base, other_tuned = make_pair(_layers(), seed=5)
    extract_lora_streamed(StateDictSource(other_base), StateDictSource(other_tuned), cfg,
                    MemoryOptions(mode="conservative"), probe=probe, cache=cache)
    assert cache.nbytes == 0


def test_threshold_offloads_and_shrinks_batch(sources, caplog) -> None:
    base, tuned = sources
    cache = ResidentCache()
    readings = iter([(8 * GIB, 16 * GIB)] * 3 + [(1 * GIB, 16 * GIB)] * 100)
    opts = MemoryOptions(mode="aggressive", blocks_in_gpu=5, batch_size=4, memory_threshold=0.85,
                         debug=True)
    with caplog.at_level(logging.DEBUG, logger="lora_extract.memory"):
        out = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), opts, probe=lambda: next(readings),
                              cache=cache, batched_svd=True)
    events = out.memory.threshold_events
    assert events and "93.8% (15.00/16.00 GiB) > 85.0%" in events[0]
    assert "batch 4 -> 2" in events[0] and "batch 2 -> 1" in events[1]
    assert cache.nbytes == 0                             # retained blocks offloaded
    assert any("VRAM threshold exceeded" in r.message for r in caplog.records)
    assert any("passed 85%" in n for n in out.result.report.notes)
    _same_tensors(extract_lora(base, tuned, ExtractConfig(rank=4)), out.result)


def test_out_of_memory_halves_batch_then_uses_cpu(sources, monkeypatch) -> None:
    base, tuned = sources
    real_batched = batch_decompose.batched.extract_matrices
    real_single = batch_decompose.extract_matrix
    failed_once: set[str] = set()
    sizes: list[int] = []

    def batched_oom(diffs, *a, **k):
        sizes.append(len(diffs))
        if len(diffs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batched(diffs, *a, **k)

    def single_oom(diff, cfg, **k):
        key = tuple(diff.shape)
        if key == (32, 32) and key not in failed_once:   # the first 32x32 layer fails once alone
            failed_once.add(key)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_single(diff, cfg, **k)

    monkeypatch.setattr(batch_decompose.batched, "extract_matrices", batched_oom)
    monkeypatch.setattr(batch_decompose, "extract_matrix", single_oom)
    cfg = ExtractConfig(rank=4)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode="maximum", batch_size=4),
                          batched_svd=True, cache=ResidentCache())
    # Batched twice (limit 4, then 2), then one layer at a time for the rest of the run.
    assert len(sizes) == 2 and all(n > 1 for n in sizes)
    ev = out.memory.oom_events
    assert "batch 4 -> 2" in ev[0] and "batch 2 -> 1" in ev[1]
    assert any("extracted on the CPU" in e for e in ev)
    assert any("batch 4 -> 2" in n for n in out.result.report.notes)
    monkeypatch.undo()
    _same_tensors(extract_lora(base, tuned, cfg), out.result)


def test_interrupt_stops_between_layers_without_file_or_thread(sources, tmp_path) -> None:
    base, tuned = sources

    class Stop(Exception):
        pass

    check = fail_on_call(lambda: None, 4, Stop())
    path = str(tmp_path / "out.safetensors")
    with pytest.raises(Stop):
        extract_to_file_streamed(base, tuned, ExtractConfig(rank=4), MemoryOptions(), path,
                           check_interrupt=check, cache=ResidentCache())
    assert check.calls == 4 and os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == "lora-extract-prefetch" and t.is_alive()]


def test_nan_in_a_model_names_key_and_model() -> None:
    base, tuned = make_pair(demo_layers(16), seed=1)
    key = "diffusion_model.blocks.0.self_attn.qkv.weight"
    tuned[key][0, 0] = float("nan")
    from lora_extract.extract import ExtractionInputError

    with pytest.raises(ExtractionInputError, match=r"qkv.weight.*tuned.*NaN"):
        extract_lora_streamed(StateDictSource(base), StateDictSource(tuned, "tuned"), ExtractConfig(),
                        MemoryOptions(), cache=ResidentCache())


def test_asks_the_host_to_free_the_budget_then_plans_with_what_is_free(sources) -> None:
    base, tuned = sources
    asked: list[int] = []
    free = [2 * GIB]

    def free_memory(nbytes: int, device: torch.device) -> None:
        asked.append(nbytes)
        free[0] = 10 * GIB                                   # ComfyUI unloaded something

    out = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), MemoryOptions(mode="balanced"),
                          probe=lambda: (free[0], 16 * GIB), free_memory=free_memory,
                          cache=ResidentCache())
    p = out.memory.plan
    assert len(asked) == 1 and asked[0] == int((p.working_bytes + p.resident_bytes) / 0.75)
    assert p.budget_bytes == int(0.75 * 10 * GIB)
    assert out.memory.initial_vram.free == 2 * GIB and out.memory.final_vram.free == 10 * GIB


def test_cpu_runs_batch_layers_side_by_side_and_restores_threads(sources) -> None:
    base, tuned = sources
    before = torch.get_num_threads()
    out = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), MemoryOptions(mode="balanced"),
                          cache=ResidentCache())
    assert out.memory.cpu_workers == min(4, os.cpu_count() or 1)
    assert torch.get_num_threads() == before
    seq = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), MemoryOptions(mode="conservative"),
                          cache=ResidentCache())
    assert seq.memory.cpu_workers == 1 and seq.memory.plan.batch_size == 1


@pytest.mark.parametrize("ahead,overlaps", [(1, True), (0, False)])
def test_reading_runs_ahead_of_compute(sources, monkeypatch, ahead: int, overlaps: bool) -> None:
    """While the first layer is decomposed, the reader already reads the next batch (or not).

    Causality, not timing: with read-ahead the first decomposition waits until the later layer
    has been read (it would wait forever otherwise); without, the read comes after it ended.
    """
    base, tuned = sources
    first_svd_key = "diffusion_model.input_blocks.0.0.weight"
    later_key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    read_later = threading.Event()
    events: list[str] = []
    real_get = tuned.get

    def get(key, device="cpu", dtype=None):
        if key == later_key:
            events.append("read later layer")
            read_later.set()
        return real_get(key, device, dtype)

    real_single = batch_decompose.extract_matrix

    def single(diff, cfg, **k):
        first = "first svd done" not in events
        if first and overlaps:
            assert read_later.wait(LIVENESS_S), "the reader never read ahead"
        out = real_single(diff, cfg, **k)
        if first:
            events.append("first svd done")
        return out

    monkeypatch.setattr(tuned, "get", get)
    monkeypatch.setattr(batch_decompose, "extract_matrix", single)
    opts = MemoryOptions(mode="conservative", prefetch_ahead=ahead)
    out = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), opts, cache=ResidentCache())
    order = ["read later layer", "first svd done"] if overlaps else ["first svd done", "read later layer"]
    assert [e for e in events if e in order] == order
    assert [r.key for r in out.result.report.layers][:3:2] == [first_svd_key, later_key]


@pytest.mark.parametrize("lora_type", ["standard", "full"])
def test_stored_float32_differences_do_not_alias_reused_buffers(lora_type: str) -> None:
    # Same-shaped parameters in a row, read one at a time: each reuses the previous one's host
    # buffer. A float32 difference stored as is must be a copy, or the next layer overwrites it.
    specs = [LayerSpec(f"diffusion_model.blocks.{i}.norm.weight", (64,), 1) for i in range(3)]
    specs += [LayerSpec(f"diffusion_model.blocks.{i}.proj.weight", (16, 16), 4) for i in range(3)]
    base, tuned = make_pair(specs, seed=8)
    b, t = StateDictSource(base), StateDictSource(tuned)
    cfg = ExtractConfig(rank=4, output_dtype="fp32", lora_type=lora_type)
    v2 = extract_lora_streamed(b, t, cfg, MemoryOptions(mode="conservative", prefetch_ahead=0),
                         cache=ResidentCache()).result
    _same_tensors(extract_lora(b, t, cfg), v2)
    stored = [v for k, v in v2.tensors.items() if k.endswith(".diff") and v.dim() == 1]
    assert len(stored) == 3
    for i, v in enumerate(stored):
        key = f"diffusion_model.blocks.{i}.norm.weight"
        torch.testing.assert_close(v, tuned[key] - base[key])
