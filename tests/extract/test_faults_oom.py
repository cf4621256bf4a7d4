"""Out of accelerator memory: the V1 run degrades to the CPU for the failing layers and completes.

There is no GPU in CI, so the accelerator is simulated: a source that hands out CPU tensors for
``device="cuda"`` reads and raises ``torch.OutOfMemoryError`` where the test says, and a wrapped
``extract_matrix`` that raises it in the middle of a layer's SVD. The CPU retries are real work,
so the file must be identical to a plain CPU run.
"""

from __future__ import annotations

import pytest
import torch

import lora_extract.extract.pair_output as pair_output
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.oom_fallback import OomFallback
from lora_extract.extract.synthetic import demo_layers, make_pair
from tests.support.fault_injection import OnNthCall

OOM = torch.OutOfMemoryError


class PretendAccelerator:
    """A source whose reads on a non-CPU device return CPU tensors, or run out of memory."""

    # Where a read that does not run out of memory puts its tensor ("cpu": whatever was asked).
    hands_out_on: str | None = "cpu"

    def __init__(self, inner: StateDictSource, oom_reads: dict[str, int] | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        self.oom_left = dict(oom_reads or {})
        self.devices: dict[str, list[str]] = {}

    def keys(self) -> list[str]:
        return self._inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._inner.shape(key)

    def get(self, key: str, device="cpu", dtype=None) -> torch.Tensor:
        dev = torch.device(device).type
        self.devices.setdefault(key, []).append(dev)
        if dev != "cpu" and self.oom_left.get(key, 0) > 0:
            self.oom_left[key] -= 1
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._inner.get(key, self.hands_out_on or device, dtype)


@pytest.fixture(autouse=True)
def pretend_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    # The config refuses "cuda" where torch has none; these tests never touch CUDA itself.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture(scope="module")
def models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_pair(demo_layers(32), seed=4)


@pytest.fixture(scope="module")
def cpu_result(models):
    base, tuned = models
    return extract_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), ExtractConfig(rank=4))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _oom_notes(res) -> list[str]:
    return [n for n in res.report.notes if "out of memory" in n or "remaining" in n]


QKV = "diffusion_model.blocks.0.self_attn.qkv.weight"
TO_Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.mark.parametrize("prefetch", [0, 2])
def test_oom_while_loading_a_layer_retries_it_on_cpu(models, cpu_result, prefetch: int) -> None:
    base, tuned = models
    tuned_src = PretendAccelerator(StateDictSource(tuned, "tuned"), {QKV: 1})
    res = extract_lora(PretendAccelerator(StateDictSource(base, "base")), tuned_src,
                       ExtractConfig(rank=4, device="cuda"), prefetch=prefetch)
    _same_tensors(res.tensors, cpu_result.tensors)
    assert tuned_src.devices[QKV] == ["cuda", "cpu"]
    assert tuned_src.devices[TO_Q] == ["cuda"]  # other layers stayed on the accelerator
    (note,) = _oom_notes(res)
    assert "out of memory on cuda: 1 layer(s)" in note and QKV in note and "the file is complete" in note


def test_oom_in_the_middle_of_an_svd_redoes_that_layer_on_cpu(models, cpu_result, monkeypatch) -> None:
    base, tuned = models
    def runs_out(diff, *_a, **_k) -> None:
        diff.mul_(0.5)  # the failed attempt had already started overwriting the difference
        raise OOM("CUDA out of memory")

    monkeypatch.setattr(pair_output, "extract_matrix", OnNthCall(pair_output.extract_matrix, 2, runs_out))
    tuned_src = PretendAccelerator(StateDictSource(tuned, "tuned"))
    res = extract_lora(PretendAccelerator(StateDictSource(base, "base")), tuned_src,
                       ExtractConfig(rank=4, device="cuda"), prefetch=2)
    _same_tensors(res.tensors, cpu_result.tensors)  # re-read, not the half-consumed difference
    retried = [k for k, devs in tuned_src.devices.items() if devs == ["cuda", "cpu"]]
    assert len(retried) == 1 and retried[0] in _oom_notes(res)[0]
    errors = {r.key: r.rel_error for r in res.report.layers}
    assert errors == {r.key: r.rel_error for r in cpu_result.report.layers}


def test_repeated_oom_switches_the_rest_of_the_run_to_cpu(models, cpu_result) -> None:
    base, tuned = models
    keys = [k for k in tuned if k.endswith(".weight") and tuned[k].ndim >= 2]
    tuned_src = PretendAccelerator(StateDictSource(tuned, "tuned"), {k: 10 for k in keys})
    res = extract_lora(PretendAccelerator(StateDictSource(base, "base")), tuned_src,
                       ExtractConfig(rank=4, device="cuda"), prefetch=0)
    _same_tensors(res.tensors, cpu_result.tensors)
    order = list(tuned)
    third = order.index(keys[2])
    for i, k in enumerate(order):
        if k in keys[:3]:
            assert tuned_src.devices[k] == ["cuda", "cpu"], k   # tried, ran out, redone
        elif i < third:
            assert tuned_src.devices[k] == ["cuda"], k          # fitted before the switch
        else:
            assert tuned_src.devices[k] == ["cpu"], k           # after the switch: CPU at once
    assert third < len(order) - 1
    notes = _oom_notes(res)
    assert len(notes) == 2 and "remaining" in notes[1]


def test_oom_on_the_cpu_is_not_swallowed(models) -> None:
    base, tuned = models

    class CpuOom(StateDictSource):
        def get(self, key, device="cpu", dtype=None):
            raise OOM("out of host memory")

    with pytest.raises(OOM):
        extract_lora(StateDictSource(base), CpuOom(tuned, "tuned"), ExtractConfig(rank=4, device="cpu"))


def test_other_errors_on_the_accelerator_are_not_retried() -> None:
    fb = OomFallback("cuda")
    attempts: list[str] = []

    def work(dev: str) -> None:
        attempts.append(dev)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        fb.call("k", work)
    assert attempts == ["cuda"] and fb.notes() == []


class OomOnDevice(PretendAccelerator):
    """On the emulated GPU: device reads give device tensors, or run out of memory."""

    hands_out_on = None


def test_oom_in_both_passes_of_a_size_budget_run_keeps_its_file(models, emulated_gpu) -> None:
    # The size budget's spectra pass and its finishing pass (V1's per-layer work) each run out
    # of memory reading one layer: both redo it on the CPU, and the run completes with the
    # same ranks and the note.
    base, tuned = models
    cfg = dict(rank=8, target_size_mb=0.05)
    cpu = extract_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), ExtractConfig(**cfg))
    tuned_src = OomOnDevice(StateDictSource(tuned, "tuned"), {QKV: 2})
    res = extract_lora(OomOnDevice(StateDictSource(base, "base")), tuned_src,
                       ExtractConfig(device="cuda", **cfg), prefetch=2)
    assert res.tensors.keys() == cpu.tensors.keys()
    assert {r.key: r.rank for r in res.report.layers} == {r.key: r.rank for r in cpu.report.layers}
    assert tuned_src.devices[QKV] == ["cuda", "cpu", "cuda", "cpu"]
    assert QKV in _oom_notes(res)[0]
