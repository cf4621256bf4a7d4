"""The exact path's partial eigensolver: the top k eigenvectors of a float64 Gram matrix from its
known eigenvalues (Chebyshev-filtered subspace iteration, checked against the exact spectrum),
and the fall back to a full eigh where it cannot be certain."""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import decompose as dec
from lora_extract.extract import exact_svd as exact
from lora_extract.extract import partial_eigh as pe
from tests.support.helpers import matrix_with_spectrum, optimal_rel_error


def _spectrum(kind: str, n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "hard":          # rank-128 structure decaying by 0.995: almost no gap at k
        return torch.where(i < 128, 0.995 ** i, 1e-3 * 0.99 ** i)
    if kind == "slow":
        return 0.985 ** i
    if kind == "gap_floor":     # a clean rank-16 change over dense noise, kept past its rank
        j = (i - 16).clamp_min(0) / (n - 16)
        return torch.where(i < 16, 0.8 ** i, 1e-3 * (1 - 0.7 * j.sqrt()))
    if kind == "flat_floor":    # rank 12 over an exactly flat floor (nothing for the filter)
        return torch.where(i < 12, 0.7 ** i, torch.full_like(i, 1e-4))
    return 1 / (1 + i) ** 0.5   # "power": heavy tail


def _rel_error(a: torch.Tensor, svd: dec.TruncatedSVD) -> float:
    approx = (svd.U.double() * svd.S.double()) @ svd.Vh.double()
    return float(torch.linalg.norm(a.double() - approx) / torch.linalg.norm(a.double()))


@pytest.mark.parametrize("kind", ["hard", "slow", "gap_floor", "flat_floor", "power"])
@pytest.mark.parametrize("shape", [(900, 300), (300, 300), (260, 700)])
def test_exact_svd_through_the_partial_eigensolver_is_optimal(kind, shape, gen, monkeypatch) -> None:
    m, n = shape
    a = matrix_with_spectrum(m, n, _spectrum(kind, min(m, n)), gen)
    used = []
    real = pe.top_eigenvectors
    monkeypatch.setattr(exact, "top_eigenvectors", lambda *args: used.append(real(*args)) or used[-1])
    k = 32
    svd = exact.exact_svd(a, k_max=k)
    assert len(used) == 1 and used[0] is not None       # certified, no fall back to eigh
    ref = torch.linalg.svdvals(a.double())
    torch.testing.assert_close(svd.S.double(), ref, rtol=1e-5, atol=1e-6 * float(ref[0]))
    for r in (1, 8, 16, k):           # every leading block is the optimal rank-r factorization
        assert _rel_error(a, svd.truncate(r)) / optimal_rel_error(a, r) <= 1 + 1e-6


def test_certified_vectors_match_eigh_where_the_spectrum_is_separated(gen) -> None:
    a = matrix_with_spectrum(600, 300, 0.9 ** torch.arange(300, dtype=torch.float64), gen).double()
    g = a.mT @ a
    evals = torch.linalg.eigvalsh(g).flip(0)
    v = pe.top_eigenvectors(g, evals, 10)
    ref = torch.linalg.eigh(g)[1].flip(1)[:, :10]
    torch.testing.assert_close((v.mT @ ref).abs().diagonal(), torch.ones(10, dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_zero_matrix_is_left_to_eigh_and_a_rank_deficient_one_is_spanned() -> None:
    n = 300
    zero = torch.zeros(n, n, dtype=torch.float64)
    assert pe.top_eigenvectors(zero, torch.zeros(n, dtype=torch.float64), 8) is None
    # k past the rank: the first 5 vectors span the column space, the other 3 are orthonormal
    # vectors of the null space (any serve: they carry no energy).
    b = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = b @ b.mT
    v = pe.top_eigenvectors(g, torch.linalg.eigvalsh(g).flip(0), 8)
    assert v is not None
    torch.testing.assert_close(v.mT @ v, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)
    q, _ = torch.linalg.qr(b)
    assert float(torch.linalg.norm(v[:, :5] - q @ (q.mT @ v[:, :5]))) <= 1e-8


def test_rank_deficient_layer_falls_back_and_stays_exact(gen) -> None:
    a = matrix_with_spectrum(700, 300, torch.linspace(1, 0.5, 6, dtype=torch.float64), gen)
    svd = exact.exact_svd(a, k_max=32)
    assert _rel_error(a, svd.truncate(6)) <= 1e-6
    assert float(svd.S[6:].abs().max()) <= 1e-5

    # A zero singular value gets a zero column of U (not A v divided by a tiny number): five
    # nonzero columns, the rest exactly zero.
    b = torch.zeros(700, 300)
    b[:, :5] = torch.randn(700, 5, generator=gen)
    svd = exact.exact_svd(b, k_max=32)
    zero = svd.S[:32] == 0
    assert int(zero.sum()) >= 20
    assert float(svd.U[:, zero].abs().max()) == 0.0
    assert _rel_error(b, svd.truncate(5)) <= 1e-6


def test_energy_check_sees_a_missing_direction() -> None:
    evals = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    assert pe.captures_top_energy(evals, evals.clone(), 3)
    short = evals.clone()
    short[1] -= 1e-6 * float(evals[2:].sum())    # the 2nd vector misses a little energy
    assert pe.captures_top_energy(evals, short, 3, tol=1e-5)
    assert not pe.captures_top_energy(evals, short, 3, tol=1e-7)
    # A shortfall in an early vector counts for every later block too.
    assert not pe.captures_top_energy(evals, torch.tensor([4.0, 2.0, 2.0, 1.0, 0.5, 0.25],
                                                          dtype=torch.float64), 3)


def test_deterministic_for_the_same_input(gen) -> None:
    a = matrix_with_spectrum(800, 300, _spectrum("slow", 300), gen)
    one, two = exact.exact_svd(a, k_max=16), exact.exact_svd(a.clone(), k_max=16)
    assert torch.equal(one.U, two.U) and torch.equal(one.Vh, two.Vh)


def test_filter_degree_follows_the_gap() -> None:
    # A wider gap below k needs a lower degree: the plan reads it from the eigenvalues.
    n, k = 400, 16
    steep = [0.9 ** i for i in range(n)]
    flat = [0.995 ** i for i in range(n)]
    _, d_steep, _, _ = pe._plan(steep, k, n)
    _, d_flat, _, _ = pe._plan(flat, k, n)
    assert d_steep < d_flat
    assert math.isfinite(d_flat)
