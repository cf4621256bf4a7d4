"""The speed levers of the CPU route: the block Rayleigh-Ritz step, differences formed straight
from the files with their energy, recycled buffers."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from lora_extract.extract import decompose as dec
from lora_extract.extract import low_precision_products
from lora_extract.extract.block_ritz import block_span
from lora_extract.extract.difference_pool import DifferencePool, scratch
from lora_extract.extract.file_difference import ChunkBuffers, difference_from_files
from lora_extract.extract.pairing import load_difference
from lora_extract.extract.sources import SafetensorsSource
from tests.support.helpers import matrix_with_spectrum, optimal_rel_error


def _rel_error(a: torch.Tensor, svd: dec.TruncatedSVD) -> float:
    approx = (svd.U.double() * svd.S.double()) @ svd.Vh.double()
    return float(torch.linalg.norm(a.double() - approx) / torch.linalg.norm(a.double()))


def test_block_span_keeps_the_last_basis_and_adds_the_earlier_directions(gen) -> None:
    a, _ = torch.linalg.qr(torch.randn(400, 12, generator=gen))
    b, _ = torch.linalg.qr(torch.randn(400, 12, generator=gen))
    # b shares 6 directions with a (to rounding): only a's other 6 are new.
    b[:, :6] = a[:, :6]
    b, _ = torch.linalg.qr(b)
    q, _ = torch.linalg.qr(block_span([a, b]))
    assert q.shape[1] == 18
    # Both spans are inside the result, exactly to float32 rounding.
    for x in (a, b):
        assert float(torch.linalg.norm(x - q @ (q.mT @ x))) < 1e-5
    # One basis: itself.
    assert block_span([a]) is a


def test_block_ritz_step_makes_a_slow_spectrum_converge_in_fewer_iterations(gen) -> None:
    # decay 0.995: 4 iterations from the last basis alone leave ~1.004x the optimum.
    m, n, k = 900, 400, 32
    a = matrix_with_spectrum(m, n, 0.995 ** torch.arange(n, dtype=torch.float64), gen)
    omega = dec.gaussian_sketch((m, n), k + 16, torch.Generator().manual_seed(4), torch.float32)
    calls: list[int] = []
    real = dec.block_span
    try:
        dec.block_span = lambda bases: calls.append(len(bases)) or real(bases)  # type: ignore[assignment]
        svd = dec.randomized_svd_with(a, omega, k, 8, iteration_dtype=torch.float32)
    finally:
        dec.block_span = real  # type: ignore[assignment]
    assert calls == [dec.RITZ_BLOCKS]          # the block step ran, over 3 bases
    block = _rel_error(a, svd) / optimal_rel_error(a, k)
    assert block <= 1.001
    # The same iterations with the step over the last basis alone: clearly worse.
    import lora_extract.extract.decompose as d
    old, d.RITZ_BLOCKS = d.RITZ_BLOCKS, 1
    try:
        alone = _rel_error(a, dec.randomized_svd_with(a, omega, k, 8, iteration_dtype=torch.float32))
    finally:
        d.RITZ_BLOCKS = old
    assert block - 1 < 0.5 * (alone / optimal_rel_error(a, k) - 1), (block, alone)


def test_converged_layers_keep_the_plain_step(gen, monkeypatch) -> None:
    # A heavy-tailed spectrum (most energy left out) converges within the iterations: the
    # plain step, no float32 step and no block step.
    a = matrix_with_spectrum(600, 300, 1 / (1 + torch.arange(300, dtype=torch.float64)) ** 0.5, gen)
    calls: list[int] = []
    real = dec.block_span
    monkeypatch.setattr(dec, "block_span", lambda bases: calls.append(len(bases)) or real(bases))
    monkeypatch.setattr(dec, "power_dtype", lambda device: torch.bfloat16)
    svd = dec.randomized_svd(a, 16, 16, 8, torch.Generator().manual_seed(1))
    assert not calls
    assert _rel_error(a, svd) / optimal_rel_error(a, 16) <= 1.001


def test_after_a_float32_step_the_ritz_step_reads_two_bases(gen, monkeypatch) -> None:
    # A clean rank-12 change over a noise floor with ~1/340 of its energy, kept at rank 24 (a
    # merged LoRA extracted past its rank): bfloat16 iterations, then the float32 step; the
    # Rayleigh-Ritz step reads that step's basis and the last bfloat16 one (1.0004x the
    # optimum here), far better than the float32 basis alone (1.0013-1.0014x).
    m, n, k = 700, 300, 24
    change = torch.randn(m, 12, generator=gen) * 0.8 ** torch.arange(12) @ torch.randn(12, n, generator=gen)
    a = change + 0.1 * torch.randn(m, n, generator=gen)
    calls: list[int] = []
    real = dec.block_span
    monkeypatch.setattr(dec, "block_span", lambda bases: calls.append(len(bases)) or real(bases))
    monkeypatch.setattr(dec, "power_dtype", lambda device: torch.bfloat16)
    svd = dec.randomized_svd(a, k, 16, 8, torch.Generator().manual_seed(1))
    assert calls == [dec.RITZ_BLOCKS_AFTER_FLOAT32_STEP] == [2]
    two = _rel_error(a, svd) / optimal_rel_error(a, k)
    assert two <= 1.0007, two
    monkeypatch.setattr(dec, "RITZ_BLOCKS_AFTER_FLOAT32_STEP", 1)
    alone = _rel_error(a, dec.randomized_svd(a, k, 16, 8, torch.Generator().manual_seed(1)))
    assert two - 1 < 0.5 * (alone / optimal_rel_error(a, k) - 1), (two, alone)


def _pair(tmp_path, gen, dtype=torch.bfloat16):
    base = {"w": torch.randn(300, 70, generator=gen).to(dtype), "c": torch.randn(8, 4, 3, 3, generator=gen).to(dtype)}
    tuned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    return (SafetensorsSource(tmp_path / "b.safetensors"), SafetensorsSource(tmp_path / "t.safetensors"),
            base, tuned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_difference_from_files_matches_the_tensors_and_its_energy_is_float64(tmp_path, gen, dtype,
                                                                             monkeypatch) -> None:
    import lora_extract.extract.file_difference as fd
    monkeypatch.setattr(fd, "CHUNK", 1000)        # several chunks, a partial last one
    b, t, base, tuned = _pair(tmp_path, gen, dtype)
    for key in ("w", "c"):
        out = torch.empty(tuned[key].shape)
        energy = difference_from_files(t, key, b, key, out, ChunkBuffers())
        want = tuned[key].float() - base[key].float()
        assert torch.equal(out, want)
        assert math.isclose(energy, float(want.double().pow(2).sum()), rel_tol=1e-12)


def test_load_difference_reads_files_into_the_pool(tmp_path, gen) -> None:
    b, t, base, tuned = _pair(tmp_path, gen)
    pool = DifferencePool(keep=2)
    d1, fro = load_difference(b, t, "w", "w", "cpu", pool)
    want = tuned["w"].float() - base["w"].float()
    assert torch.equal(d1, want) and math.isclose(fro, float(want.double().norm()), rel_tol=1e-12)
    ptr = d1.data_ptr()
    pool.give_back(d1)
    d2, _ = load_difference(b, t, "c", "c", "cpu", pool)      # smaller: the same memory again
    assert d2.data_ptr() == ptr and d2.shape == (8, 4, 3, 3)
    assert torch.equal(d2, tuned["c"].float() - base["c"].float())


def test_pool_keeps_at_most_keep_buffers_and_hands_the_smallest_that_fits() -> None:
    pool = DifferencePool(keep=2)
    big, mid, small = torch.empty(1000), torch.empty(500), torch.empty(100)
    for x in (big, mid, small):
        pool.give_back(x)
    # small (the smallest) was dropped past keep=2; 400 elements fit mid best.
    got = pool.take((20, 20))
    assert got.data_ptr() == mid.data_ptr()
    assert pool.take((900,)).data_ptr() == big.data_ptr()
    assert pool.take((50,)).data_ptr() not in (big.data_ptr(), mid.data_ptr(), small.data_ptr())
    # bfloat16 from float32 storage: bytes count.
    pool.give_back(big)
    assert pool.take((2000,), torch.bfloat16).data_ptr() == big.data_ptr()


def test_scratch_uses_the_pool_only_inside_using() -> None:
    pool = DifferencePool(keep=2)
    storage = torch.empty(4096)
    pool.give_back(storage)
    like = torch.empty(64, 64)
    with scratch(like, torch.bfloat16) as t:
        assert t.data_ptr() != storage.data_ptr()
    with pool.using(), scratch(like, torch.bfloat16) as t:
        assert t.data_ptr() == storage.data_ptr() and t.dtype == torch.bfloat16
    # Given back after the block.
    assert pool.take((4096,)).data_ptr() == storage.data_ptr()


@pytest.mark.parametrize("wide", [False, True])
def test_bfloat16_products_read_either_stored_layout(gen, wide) -> None:
    # A wide layer is iterated as the transpose view of its stored matrix; the products take
    # the stored matrix as it lies, and must equal low @ x and low^T @ q either way.
    stored = torch.randn(*((70, 300) if wide else (300, 70)), generator=gen).bfloat16()
    low = stored.mT if wide else stored
    assert low_precision_products.stored_transposed(low) is wide
    x = torch.randn(low.shape[1], 12, generator=gen)
    q = torch.randn(low.shape[0], 12, generator=gen)
    ref = low.double()
    for got, want in ((low_precision_products.product(low, x), ref @ x.bfloat16().double()),
                      (low_precision_products.product_t(low, q), ref.mT @ q.bfloat16().double())):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
