"""Per-layer extraction against the optimal truncated SVD (Eckart-Young)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, extract_matrix
from lora_extract.extract.clamp import abs_quantile_rows
from lora_extract.extract.decompose import randomized_svd
from lora_extract.extract.exact_svd import exact_svd, singular_values
from tests.support.helpers import matrix_with_spectrum, optimal_rel_error

EXACT = ExtractConfig(rank=16, clamp_quantile=None, output_dtype="fp32")


def _reconstruct(res) -> torch.Tensor:
    f = res.factors
    up = f.up.float().reshape(f.up.shape[0], -1)
    down = f.down.float().reshape(f.rank, -1)
    return (f.alpha / f.rank) * (up @ down)


@pytest.mark.parametrize("m,n", [(300, 200), (200, 300)])
def test_exact_error_equals_discarded_singular_values(m: int, n: int, gen: torch.Generator) -> None:
    sigma = 0.9 ** torch.arange(min(m, n), dtype=torch.float32)
    a = matrix_with_spectrum(m, n, sigma, gen)
    res = extract_matrix(a.clone(), EXACT)
    expected = math.sqrt(float((sigma[16:].double() ** 2).sum() / (sigma.double() ** 2).sum()))
    assert res.factors.rank == 16
    assert res.rel_error == pytest.approx(expected, rel=1e-3)
    assert res.rel_error_unclamped == pytest.approx(expected, rel=1e-3)
    direct = float(torch.linalg.norm(a - _reconstruct(res)) / torch.linalg.norm(a))
    assert direct == pytest.approx(res.rel_error, rel=1e-4)


def test_lowrank_within_one_percent_of_optimal(gen: torch.Generator) -> None:
    # Slowly decaying spectrum plus noise: the hard case for randomized SVD.
    sigma = 1.0 / (1.0 + torch.arange(600, dtype=torch.float32)) ** 0.5
    a = matrix_with_spectrum(900, 600, sigma, gen) + 1e-3 * torch.randn(900, 600, generator=gen)
    cfg = ExtractConfig(rank=32, clamp_quantile=None, output_dtype="fp32", algorithm="svd_lowrank",
                        lowrank_iters=7)
    res = extract_matrix(a.clone(), cfg, generator=torch.Generator().manual_seed(0))
    assert res.rel_error <= optimal_rel_error(a, 32) * 1.01


def test_randomized_svd_matches_exact_values(gen: torch.Generator) -> None:
    sigma = 0.8 ** torch.arange(50, dtype=torch.float32)
    a = matrix_with_spectrum(500, 400, sigma, gen)
    r = randomized_svd(a, 10, 16, 4, torch.Generator().manual_seed(1))
    e = exact_svd(a)
    torch.testing.assert_close(r.S, e.S[:10], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(singular_values(a)[:10], e.S[:10], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (64, 32, 1, 1), (48, 16, 1, 2, 2), (40, 8, 3)])
def test_conv_shapes_reconstruct(shape: tuple[int, ...], gen: torch.Generator) -> None:
    out_dim, in_flat = shape[0], math.prod(shape[1:])
    a = matrix_with_spectrum(out_dim, in_flat, 0.7 ** torch.arange(min(out_dim, in_flat), dtype=torch.float32),
                             gen).reshape(shape)
    res = extract_matrix(a.clone(), ExtractConfig(rank=8, clamp_quantile=None, output_dtype="fp32"))
    f = res.factors
    assert f.down.shape == (8, *shape[1:])
    assert f.up.shape == (out_dim, 8, *([1] * (len(shape) - 2)))
    assert res.rel_error == pytest.approx(optimal_rel_error(a, 8), rel=1e-3)
    # ComfyUI's rule: flatten both factors from dim 1, multiply, reshape to the weight.
    rec = (f.alpha / f.rank) * (f.up.flatten(1) @ f.down.flatten(1)).reshape(shape)
    assert float(torch.linalg.norm(rec - a) / torch.linalg.norm(a)) == pytest.approx(res.rel_error, rel=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 4.0, 32.0])
def test_alpha_rescales_factors(alpha: float, gen: torch.Generator) -> None:
    a = matrix_with_spectrum(120, 80, 0.8 ** torch.arange(80, dtype=torch.float32), gen)
    ref = extract_matrix(a.clone(), EXACT)
    res = extract_matrix(a.clone(), ExtractConfig(rank=16, clamp_quantile=None, output_dtype="fp32", alpha=alpha))
    assert res.factors.alpha == alpha
    torch.testing.assert_close(_reconstruct(res), _reconstruct(ref), rtol=1e-4, atol=1e-6)
    # Balanced: the factor norms stay comparable whatever alpha is.
    scale = math.sqrt(16 / alpha)
    torch.testing.assert_close(res.factors.up, ref.factors.up * scale, rtol=1e-4, atol=1e-6)


def test_clamp_matches_torch_quantile_and_is_measured(gen: torch.Generator) -> None:
    up = torch.randn(200, 8, generator=gen)
    down = torch.randn(8, 300, generator=gen)
    for x in (up.T, down):   # one quantile per rank component, of its own entries
        ours = abs_quantile_rows(x, 0.99)
        # Reference in float64: torch.quantile on float32 input forms the position q*(n-1) in
        # float32 (0.99 -> 0.9900000095), which moves its interpolation by ~2e-6 relative.
        ref = torch.quantile(x.abs().double(), 0.99, dim=1).float()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    a = matrix_with_spectrum(300, 200, 0.9 ** torch.arange(200, dtype=torch.float32), gen)
    res = extract_matrix(a.clone(), ExtractConfig(rank=16, output_dtype="fp32"))
    assert res.clamp_threshold is not None
    assert res.rel_error >= res.rel_error_unclamped - 1e-6
    assert float(res.factors.up.abs().max()) <= res.clamp_threshold + 1e-6


def test_clamp_beyond_torch_quantile_limit() -> None:
    n = 2**24 + 10  # torch.quantile refuses this many elements
    t = torch.arange(n, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(t, 0.5)
    assert float(abs_quantile_rows(t.unsqueeze(0), 0.5)[0]) == pytest.approx((n - 1) / 2)


def test_half_precision_output_error_is_measured(gen: torch.Generator) -> None:
    a = matrix_with_spectrum(200, 100, 0.8 ** torch.arange(100, dtype=torch.float32), gen)
    res = extract_matrix(a.clone(), ExtractConfig(rank=16, clamp_quantile=None, output_dtype="fp16"))
    assert res.factors.up.dtype == torch.float16
    direct = float(torch.linalg.norm(a - _reconstruct(res)) / torch.linalg.norm(a))
    assert direct == pytest.approx(res.rel_error, rel=1e-3)
    assert res.rel_error >= res.rel_error_unclamped


@pytest.mark.parametrize("m,n", [(600, 200), (200, 600)])
def test_gram_route_of_exact_svd_matches_lapack(m: int, n: int, gen: torch.Generator) -> None:
    sigma = 0.97 ** torch.arange(min(m, n), dtype=torch.float32)
    a = matrix_with_spectrum(m, n, sigma, gen)
    g = exact_svd(a, k_max=20)              # aspect 3: the float64 Gram route
    assert g.S.numel() == min(m, n) and g.U.shape == (m, 20) and g.Vh.shape == (20, n)
    torch.testing.assert_close(g.S, torch.linalg.svdvals(a.double()).float(), rtol=1e-5, atol=1e-6)
    rec = (g.U * g.S[:20]) @ g.Vh
    best = exact_svd(a.double()).truncate(20)  # float64 input: LAPACK route
    torch.testing.assert_close(rec.double(), (best.U * best.S) @ best.Vh, rtol=1e-4, atol=1e-5)


def test_factors_do_not_depend_on_the_svd_route(gen: torch.Generator) -> None:
    from lora_extract.extract.layer import canonical_signs
    from lora_extract.extract.truncated_svd import TruncatedSVD

    a = matrix_with_spectrum(90, 60, 0.8 ** torch.arange(60, dtype=torch.float32), gen)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    flip = torch.tensor([(-1.0) ** i for i in range(60)])
    one = canonical_signs(TruncatedSVD(u, s, vh))
    other = canonical_signs(TruncatedSVD(u * flip, s, vh * flip.unsqueeze(1)))
    torch.testing.assert_close(one.U, other.U)
    torch.testing.assert_close(one.Vh, other.Vh)
    assert bool((one.U.abs().argmax(0) == one.U.argmax(0)).all())  # largest entry positive
