"""Norms that feed a rank rule, a report or validation accumulate in float64.

``torch.linalg.vector_norm`` on a large float32 CPU tensor sums in float32 (0.3% low on 28M
entries). These tests use tensors whose exact norm is known in closed form: every entry is
k / 1024 for an integer k, so every square and every partial sum is exact in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract.norms import (
    frobenius_norm,
    frobenius_norm_tensor,
    gram_float64,
    sum_of_squares,
    sum_of_squares_tensor,
)
from lora_extract.extract.pairing import load_difference
from lora_extract.extract.sources import StateDictSource

N = 28_000_000
PERIOD = 4097          # k runs over -2048..2048, repeating


def _exact_sum_of_squares(n: int) -> float:
    """sum over i < n of ((i % PERIOD) - 2048)^2 / 2^20, exactly (Python integers)."""
    full, rest = divmod(n, PERIOD)
    per_period = sum((j - 2048) ** 2 for j in range(PERIOD))
    partial = sum((j - 2048) ** 2 for j in range(rest))
    return (full * per_period + partial) / 2**20


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    k = torch.arange(N, dtype=torch.int32).remainder_(PERIOD).sub_(2048)
    return (k.float() / 1024).reshape(5000, 5600)


@pytest.fixture(scope="module")
def exact() -> float:
    return _exact_sum_of_squares(N)


def test_sum_of_squares_is_exact_on_28m_entries(big: torch.Tensor, exact: float) -> None:
    assert sum_of_squares(big) == pytest.approx(exact, rel=1e-12)
    t = sum_of_squares_tensor(big)
    assert t.dtype == torch.float64 and t.device == big.device and t.dim() == 0
    assert float(t) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_sum_is_exact_and_the_same_each_time(big: torch.Tensor, exact: float, threads: int,
                                                   monkeypatch) -> None:
    # The numpy route splits a large tensor over torch's threads: every part in float64, the
    # parts added in a fixed order, so the total is exact and repeatable whatever the split.
    from lora_extract.extract import norms
    monkeypatch.setattr(norms.torch, "get_num_threads", lambda: threads)
    calls = []
    real = norms._einsum_sq
    monkeypatch.setattr(norms, "_einsum_sq", lambda a: calls.append(a.size) or real(a))
    first = sum_of_squares(big)
    assert first == pytest.approx(exact, rel=1e-12)
    assert len(calls) == threads and sum(calls) == big.numel()
    assert sum_of_squares(big) == first


def test_split_sum_raises_a_helpers_exception_in_the_caller(big: torch.Tensor, monkeypatch) -> None:
    from lora_extract.extract import norms
    monkeypatch.setattr(norms.torch, "get_num_threads", lambda: 2)
    real = norms._einsum_sq

    def second_part_fails(a):
        if a.base is not None and a.ctypes.data != big.numpy().ctypes.data:
            raise KeyboardInterrupt
        return real(a)

    monkeypatch.setattr(norms, "_einsum_sq", second_part_fails)
    with pytest.raises(KeyboardInterrupt):
        sum_of_squares(big)


def test_chunked_route_is_exact_on_28m_entries(big: torch.Tensor, exact: float,
                                              monkeypatch) -> None:
    # The torch chunk loop (GPUs, bfloat16 and other dtypes numpy cannot read), run on the CPU.
    from lora_extract.extract import norms
    monkeypatch.setattr(norms, "_NUMPY_DTYPES", ())
    assert sum_of_squares(big) == pytest.approx(exact, rel=1e-12)
    assert sum_of_squares(big[:1000].bfloat16()) == pytest.approx(
        float((big[:1000].bfloat16().double() ** 2).sum()), rel=1e-14)


def test_frobenius_norm_is_exact_on_28m_entries(big: torch.Tensor, exact: float) -> None:
    assert frobenius_norm(big) == pytest.approx(math.sqrt(exact), rel=1e-12)
    t = frobenius_norm_tensor(big)
    assert t.dtype == torch.float64
    assert float(t) == pytest.approx(math.sqrt(exact), rel=1e-12)


def test_norm_of_non_contiguous_half_and_empty_tensors(big: torch.Tensor) -> None:
    x = big[:64, :96]
    ref = float((x.double() ** 2).sum())
    assert sum_of_squares(x.T) == pytest.approx(ref, rel=1e-14)          # a strided view
    assert sum_of_squares(x.half()) == pytest.approx(ref, rel=1e-14)     # k/1024, |k| <= 2048: exact in fp16
    assert frobenius_norm(torch.empty(0, 5)) == 0.0
    assert frobenius_norm(torch.tensor([3.0, float("inf")])) == float("inf")
    assert math.isnan(frobenius_norm(torch.tensor([float("nan"), 1.0])))


def test_load_difference_norm_is_exact_on_28m_entries(big: torch.Tensor, exact: float) -> None:
    # What the rank rules take as the layer's total energy, and every relative error divides by.
    base = StateDictSource({"w": torch.zeros(big.shape, dtype=torch.bfloat16)}, "base")
    tuned = StateDictSource({"w": big}, "tuned")
    diff, fro = load_difference(base, tuned, "w", "w")
    assert fro * fro == pytest.approx(exact, rel=1e-12)


def test_gram_float64_is_exact() -> None:
    # Entries k/1024: every product and partial sum below 2^53 / 2^20 is exact in float64.
    k = torch.arange(3 * 2**21, dtype=torch.int32).remainder_(PERIOD).sub_(2048).reshape(3, 2**21)
    a = k.float() / 1024
    ki = k.to(torch.int64)
    exact = torch.stack([(ki[i] * ki).sum(1) for i in range(3)]).double() / 2**20
    g = gram_float64(a)
    assert g.dtype == torch.float64
    assert torch.equal(g, exact)
