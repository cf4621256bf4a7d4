"""The reader thread beside CPU compute runs its torch operations on one thread.

A reader with its own thread team the size of the machine slowed the compute thread's matrix
products by 1.2-1.4x (docs/performance.md); these tests pin where the limit applies and that
it never reaches the compute thread.
"""

from __future__ import annotations

import threading

import pytest
import torch

import lora_extract.extract.layer_work as layer_work
from lora_extract.extract import ExtractConfig, extract_lora
from lora_extract.extract.op_threads import limit_this_thread_to_one_op_thread
from lora_extract.extract.prefetch import Prefetcher
from lora_extract.extract.sources import StateDictSource

needs_threads = pytest.mark.skipif(
    torch.get_num_threads() < 2 or "OpenMP" not in torch.__config__.parallel_info(),
    reason="needs torch's OpenMP backend and at least two intra-op threads")


def _in_thread(fn):
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@needs_threads
def test_limit_applies_to_the_calling_thread_only() -> None:
    before = torch.get_num_threads()
    got = _in_thread(lambda: (limit_this_thread_to_one_op_thread(), torch.get_num_threads()))
    assert got == (True, 1)
    assert torch.get_num_threads() == before          # the caller's count is untouched
    # A new thread still starts with the default count (no process-wide default was changed).
    assert _in_thread(torch.get_num_threads) == before


@needs_threads
@pytest.mark.parametrize("cpu_compute", [True, False])
def test_prefetch_reader_threads_follow_the_compute_device(cpu_compute: bool) -> None:
    before = torch.get_num_threads()
    seen = [item for _, item in Prefetcher(range(3), lambda i: torch.get_num_threads(), 2,
                                           cpu_compute=cpu_compute)]
    assert seen == ([1, 1, 1] if cpu_compute else [before] * 3)
    assert torch.get_num_threads() == before


@needs_threads
def test_v1_cpu_run_reads_on_one_thread_and_computes_on_all(monkeypatch) -> None:
    before = torch.get_num_threads()
    reads: list[int] = []
    computes: list[int] = []
    real_load, real_process = layer_work.load_difference, layer_work.process_pair
    monkeypatch.setattr(layer_work, "load_difference",
                        lambda *a, **k: reads.append(torch.get_num_threads()) or real_load(*a, **k))
    monkeypatch.setattr(layer_work, "process_pair",
                        lambda *a, **k: computes.append(torch.get_num_threads()) or real_process(*a, **k))
    g = torch.Generator().manual_seed(0)
    base = {f"m.{i}.weight": torch.randn(64, 48, generator=g) for i in range(4)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    result = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(rank=4))
    assert len(result.report.layers) == 4
    assert reads == [1] * 4                    # the reader thread, beside the CPU compute
    assert computes == [before] * 4            # the layer loop's thread keeps every core
