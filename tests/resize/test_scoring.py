"""Resize numerics: QR-path SVD, scoring methods with known norms, thr/size selection, recipes."""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract.errors import ExtractionInputError
from lora_extract.extract.rank_rules import select_rank
from lora_extract.resize.base_model import spectral_norm
from lora_extract.resize.decompose import (
    DecomposedLayer,
    decompose_layer,
    dense_svd_of_product,
    subspace_scales,
    svd_of_product,
)
from lora_extract.resize.recipe import parse_recipe, parse_recipes
from lora_extract.resize.scoring import bytes_per_dim, layer_scores, select
from tests.support.helpers import matrix_with_spectrum
from tests.support.resize_fixtures import lora_pair, spectrum


@pytest.mark.parametrize("out,inn,r", [
    (64, (48,), 8),            # linear
    (40, (12, 3, 3), 6),       # LoCon 3x3: down [r, in, 3, 3], up [out, r, 1, 1]
    (10, (200,), 16),          # rank above out: the core is out x r
    (300, (7,), 12),           # rank above in
])
def test_qr_path_equals_dense_svd(out, inn, r, gen) -> None:
    up = torch.randn(out, r, *([1] * (len(inn) - 1)), generator=gen, dtype=torch.float64)
    down = torch.randn(r, *inn, generator=gen, dtype=torch.float64)
    u, s, vh = svd_of_product(up, down)
    du, ds, dvh = dense_svd_of_product(up, down)
    k = min(r, out, math.prod(inn))
    assert s.numel() == k
    torch.testing.assert_close(s, ds[:k], rtol=1e-10, atol=1e-10)
    product = up.reshape(out, -1) @ down.reshape(r, -1)
    torch.testing.assert_close((u * s) @ vh, product, rtol=1e-10, atol=1e-10)
    # orthonormal singular vectors, same subspaces as the dense SVD (up to sign per column)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close((u.T @ du[:, :k]).abs().diagonal(), torch.ones(k, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_decompose_folds_alpha_scale(gen) -> None:
    sigma = spectrum(6, top=2.0)
    up, down = lora_pair(30, (20,), sigma, gen, alpha=3.0)
    layer = decompose_layer("x", up, down, scale=3.0 / 6, output_scale=3.0 / 6)
    torch.testing.assert_close(layer.S.double(), sigma, rtol=1e-5, atol=1e-6)


def _layer_with_base(gen, base_sigma: torch.Tensor, lora_sigma: torch.Tensor, out=40, inn=30):
    base = matrix_with_spectrum(out, inn, base_sigma, gen)
    up, down = lora_pair(out, (inn,), lora_sigma, gen)
    layer = decompose_layer("layer", up, down, 1.0, 1.0)
    layer.base_fro = float(torch.linalg.vector_norm(base))
    layer.base_spn = spectral_norm(base)
    layer.subspace = subspace_scales(layer, base)
    return layer, base


def test_spectral_norm_is_exact(gen) -> None:
    sigma = torch.tensor([5.0, 4.999, 1.0, 0.5], dtype=torch.float64)
    w = matrix_with_spectrum(300, 70, sigma, gen)
    assert spectral_norm(w) == pytest.approx(5.0, rel=1e-6)
    assert spectral_norm(w.T.contiguous()) == pytest.approx(5.0, rel=1e-6)


def test_every_scoring_method_on_known_norms(gen) -> None:
    base_sigma = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)   # spn 8, fro sqrt(85)
    lora_sigma = torch.tensor([0.5, 0.05, 0.005], dtype=torch.float64)
    layer, base = _layer_with_base(gen, base_sigma, lora_sigma)
    log_s = torch.log10(lora_sigma)

    def scores(text: str) -> torch.Tensor:
        return layer_scores(layer, parse_recipe(text + ",thr=0"))

    torch.testing.assert_close(scores("spn_ckpt"), log_s - math.log10(8.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores("fro_ckpt"), log_s - math.log10(math.sqrt(85.0)), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores("spn_lora"), log_s - math.log10(0.5), rtol=0, atol=1e-5)
    fro_lora = math.sqrt(float((lora_sigma ** 2).sum()))
    torch.testing.assert_close(scores("fro_lora"), log_s - math.log10(fro_lora), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores("params"), log_s - math.log10(40 + 30), rtol=0, atol=1e-5)
    w = base.double()
    u, vh = layer.U.double(), layer.Vh.double()
    expected_sub = torch.stack([(u[:, i] @ w @ vh[i]).abs() for i in range(3)])
    torch.testing.assert_close(scores("subspace"), log_s - torch.log10(expected_sub), rtol=0, atol=1e-4)
    # weights normalise to 1: fro_ckpt=3,spn_lora=1 is 0.75 / 0.25
    mixed = scores("fro_ckpt=3,spn_lora=1")
    expected = log_s - 0.75 * math.log10(math.sqrt(85.0)) - 0.25 * math.log10(0.5)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)


def test_rescale_shifts_scores_and_lora_references_stay_unscaled(gen) -> None:
    layer, _ = _layer_with_base(gen, torch.tensor([3.0, 1.0], dtype=torch.float64),
                                torch.tensor([1.0, 0.1], dtype=torch.float64))
    plain = layer_scores(layer, parse_recipe("spn_lora,thr=0"))
    scaled = layer_scores(layer, parse_recipe("spn_lora,thr=0,rescale=0.5"))
    torch.testing.assert_close(scaled - plain, torch.full((2,), math.log10(0.5), dtype=torch.float64))


def test_threshold_keeps_exact_ranks_on_constructed_spectra(gen) -> None:
    # spn_lora scores are log10(sigma_i / sigma_1): with sigma_i = 10^-i the scores are -i.
    sigma = 10.0 ** -torch.arange(6, dtype=torch.float64)
    up, down = lora_pair(50, (40,), sigma, gen)
    layer = decompose_layer("x", up, down, 1.0, 1.0)
    for thr, expected in ((-0.5, 1), (-2.5, 3), (-4.5, 5), (-9.0, 6)):
        sel = select([layer], parse_recipe(f"spn_lora,thr={thr}"), 2)
        assert int(sel.masks[0].sum()) == expected
        assert sel.threshold == thr
    # the spn_lora threshold is the registry's adaptive_ratio rule at p = 10^thr
    s = layer.S.double()
    for thr in (-0.5, -1.5, -3.5):
        sel = select([layer], parse_recipe(f"spn_lora,thr={thr}"), 2)
        assert int(sel.masks[0].sum()) == select_rank("adaptive_ratio", s, 10 ** thr, cap=6, n=40)


def test_threshold_keeps_scores_equal_to_it(gen) -> None:
    layer, _ = _layer_with_base(gen, torch.tensor([1.0], dtype=torch.float64),
                                torch.tensor([1.0, 0.5], dtype=torch.float64))
    recipe = parse_recipe("spn_lora,thr=0")
    scores = layer_scores(layer, recipe)
    sel = select([layer], parse_recipe(f"spn_lora,thr={float(scores[1])}"), 2)
    assert int(sel.masks[0].sum()) == 2


def _layers_for_size(gen):
    layers = []
    for out, inn, r, top in ((64, 48, 12, 1.0), (32, 96, 8, 0.3), (128, 16, 10, 2.0)):
        up, down = lora_pair(out, (inn,), spectrum(r, top, 0.6), gen)
        layers.append(decompose_layer(f"l{out}", up, down, 1.0, 1.0))
    return layers


@pytest.mark.parametrize("elem,size_mib", [(2, 0.003), (2, 0.006), (4, 0.006), (4, 0.012)])
def test_size_selection_within_one_dimension_of_target(gen, elem, size_mib) -> None:
    layers = _layers_for_size(gen)
    sel = select(layers, parse_recipe(f"spn_lora,size={size_mib}"), elem)
    target = size_mib * (1 << 20)
    kept = sum(int(m.sum()) * bytes_per_dim(layer, elem) for m, layer in zip(sel.masks, layers, strict=True))
    assert kept == sel.kept_bytes
    assert sel.threshold > -math.inf and kept <= target
    # the best dimension left out would not have fitted
    dropped = [(float(s[~m].max()), bytes_per_dim(layer, elem))
               for s, m, layer in zip(sel.scores, sel.masks, layers, strict=True) if (~m).any()]
    best_cost = max(dropped)[1]
    assert target - kept < best_cost
    assert all(float(s[m].min()) >= sel.threshold for s, m in zip(sel.scores, sel.masks, strict=True) if m.any())


def test_size_larger_than_lora_keeps_everything_with_minus_inf(gen) -> None:
    layers = _layers_for_size(gen)
    sel = select(layers, parse_recipe("fro_lora,size=100"), 2)
    assert sel.threshold == -math.inf
    assert all(bool(m.all()) for m in sel.masks)


def test_size_too_small_for_one_dimension_is_an_error(gen) -> None:
    with pytest.raises(ExtractionInputError, match="smaller than a single dimension"):
        select(_layers_for_size(gen), parse_recipe("spn_lora,size=0.00001"), 2)


def test_recipe_parsing_and_names() -> None:
    r = parse_recipe("fro_ckpt=3,spn_lora=1,thr=-2")
    assert r.weights == (("fro_ckpt", 0.75), ("spn_lora", 0.25))
    assert r.details() == "frockpt0.75_spnlora0.25"
    r = parse_recipe("spn_ckpt,size=6,rescale=0.8")
    assert r.details() == "spnckpt1.00_scale0.8_size6" and r.weight("spn_ckpt") == 1.0
    assert [x.text for x in parse_recipes("fro_ckpt=1,thr=-3.5:spn_lora,thr=-0.7")] == [
        "fro_ckpt=1,thr=-3.5", "spn_lora,thr=-0.7"]
    assert parse_recipes("")[0].text == "fro_ckpt=1,thr=-3.5"


@pytest.mark.parametrize("text,needle", [
    ("fro_ckpt=1", "exactly one of thr= and size="),
    ("fro_ckpt=1,thr=-1,size=3", "exactly one of thr= and size="),
    ("thr=-1", "no scoring method"),
    ("fro_ckpt=0,thr=-1", "no scoring method"),
    ("fro_ckpt=abc,thr=-1", "fro_ckpt='abc' is not a number"),
    ("fro_ckpt,thr=", "thr needs a value"),
    ("fro_ckpt,thr=-1,bogus=2", "unknown key 'bogus'"),
    ("fro_ckpt,size=-3", "size=-3 must be a positive"),
    ("fro_ckpt=-1,spn_lora,thr=1", "negative"),
    ("fro_ckpt,rescale=0,thr=1", "rescale=0 must be positive"),
    ("fro_ckpt,fro_ckpt=2,thr=1", "given twice"),
])
def test_recipe_errors_are_clear(text, needle) -> None:
    with pytest.raises(ExtractionInputError) as e:
        parse_recipe(text)
    msg = str(e.value)
    assert needle in msg and repr(text) in msg and "fro_ckpt=1,thr=-3.5" in msg


def _exact_layer(sigma: list[float], out: int = 6, inn: int = 4, **base) -> DecomposedLayer:
    """A decomposed layer with exactly these singular values (no SVD rounding), ``out + in``
    parameters per dimension, and the given base statistics."""
    s = torch.tensor(sigma, dtype=torch.float64)
    k = s.numel()
    return DecomposedLayer(prefix=f"l{out}x{inn}", U=torch.zeros(out, k, dtype=torch.float64), S=s,
                           Vh=torch.zeros(k, inn, dtype=torch.float64), down_tail=(inn,), up_tail=(),
                           output_scale=1.0, source_rank=k, **base)


def test_all_six_methods_together_sum_their_weighted_references() -> None:
    # Every reference a distinct power of ten, every weight distinct: a method whose term is
    # dropped, replaced or of the wrong sign changes the scores.
    layer = _exact_layer([100.0, 10.0, 1.0], out=6, inn=4, base_spn=1000.0, base_fro=10.0,
                         subspace=torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    recipe = parse_recipe("fro_ckpt=1,fro_lora=2,params=3,spn_ckpt=4,spn_lora=5,subspace=5,thr=0")
    refs = {"fro_ckpt": 1.0, "fro_lora": math.log10(math.sqrt(10101.0)), "params": 1.0, "spn_ckpt": 3.0,
            "spn_lora": 2.0}
    offset = sum(w * refs[m] for m, w in zip(refs, (1, 2, 3, 4, 5), strict=True)) / 20
    expected = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) - offset \
        - 5 / 20 * torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(layer_scores(layer, recipe), expected, rtol=0, atol=1e-12)


def test_zero_references_and_zero_singular_values_floor_at_1e_minus_30() -> None:
    # A zero base weight (e.g. a zero-initialised layer): its dimensions score 30 above log10(sigma)
    zero_base = _exact_layer([1.0, 0.01], base_fro=0.0, base_spn=0.0,
                             subspace=torch.zeros(2, dtype=torch.float64))
    for method in ("fro_ckpt", "spn_ckpt", "subspace"):
        torch.testing.assert_close(layer_scores(zero_base, parse_recipe(f"{method},thr=0")),
                                   torch.tensor([30.0, 28.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # a never-trained (all-zero) LoRA layer scores log10(1e-30) against a real base: never kept
    untrained = _exact_layer([0.0, 0.0], base_fro=100.0)
    scores = layer_scores(untrained, parse_recipe("fro_ckpt,thr=0"))
    torch.testing.assert_close(scores, torch.tensor([-32.0, -32.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert int(select([untrained], parse_recipe("fro_ckpt,thr=-20"), 2).masks[0].sum()) == 0


@pytest.mark.parametrize("method", ["fro_ckpt", "fro_lora", "params", "spn_ckpt", "spn_lora", "subspace"])
def test_an_empty_spectrum_scores_nothing_with_every_method(method: str) -> None:
    layer = _exact_layer([], base_fro=1.0, base_spn=1.0, subspace=torch.zeros(0, dtype=torch.float64))
    scores = layer_scores(layer, parse_recipe(f"{method},thr=0"))
    assert scores.dtype == torch.float64 and scores.shape == (0,)
    sel = select([layer], parse_recipe(f"{method},thr=-3"), 2)
    assert sel.kept_bytes == 0 and sel.quantiles == [] and sel.masks[0].shape == (0,)


def test_nothing_to_score_keeps_nothing_without_error() -> None:
    # A LoRA whose layers all went unresized (only copied tensors): no dimension to select.
    by_thr = select([], parse_recipe("spn_lora,thr=-2.5"), 2)
    assert (by_thr.threshold, by_thr.masks, by_thr.scores, by_thr.kept_bytes, by_thr.quantiles) == (
        -2.5, [], [], 0, [])
    by_size = select([], parse_recipe("spn_lora,size=1"), 2, fixed_bytes=1000)
    assert (by_size.threshold, by_size.masks, by_size.kept_bytes, by_size.quantiles) == (-math.inf, [], 0, [])


def test_size_below_the_copied_tensors_names_the_best_dimension_cost() -> None:
    # budget int(0.001 MiB) = 1048 bytes < 2000 bytes of copied tensors. The message gives the
    # cost of the best-scoring dimension: 12 + 8 parameters at 2 bytes (not the empty layer).
    layers = [_exact_layer([], out=3, inn=3, base_fro=1.0),
              _exact_layer([1.0], out=6, inn=4, base_fro=1.0),
              _exact_layer([5.0], out=12, inn=8, base_fro=1.0)]
    with pytest.raises(ExtractionInputError) as e:
        select(layers, parse_recipe("fro_ckpt,size=0.001"), 2, fixed_bytes=2000)
    assert str(e.value) == (
        "score recipe 'fro_ckpt,size=0.001': size=0.001 MiB is smaller than a single dimension "
        "(40 bytes) plus the copied tensors (2000 bytes). Give a larger size.")
    with pytest.raises(ExtractionInputError) as e:
        select([], parse_recipe("fro_ckpt,size=0.001"), 2, fixed_bytes=2000)
    assert "a single dimension (0 bytes) plus the copied tensors (2000 bytes)" in str(e.value)


def test_a_size_too_small_for_a_one_dimension_lora_is_an_error() -> None:
    layer = _exact_layer([1.0], out=40, inn=24)   # one dimension: 128 bytes in fp16 = 2^-13 MiB
    assert int(select([layer], parse_recipe(f"spn_lora,size={2 ** -13}"), 2).masks[0].sum()) == 1
    with pytest.raises(ExtractionInputError) as e:
        select([layer], parse_recipe(f"spn_lora,size={2 ** -14}"), 2)        # 64 bytes
    assert str(e.value) == (
        f"score recipe 'spn_lora,size={2 ** -14}': size={2 ** -14} MiB is smaller than a single dimension "
        "(128 bytes) plus the copied tensors (0 bytes). Give a larger size.")


def test_a_size_that_exactly_fits_k_dimensions_keeps_k() -> None:
    # 2^-10 MiB = 1024 bytes; one dimension of a 40 + 24 layer in fp16 is 128 bytes: exactly 8 fit.
    layer = _exact_layer([10.0 ** -i for i in range(10)], out=40, inn=24)
    sel = select([layer], parse_recipe(f"spn_lora,size={2 ** -10}"), 2)
    assert int(sel.masks[0].sum()) == 8 and sel.kept_bytes == 1024
    assert sel.threshold == pytest.approx(-7.0, abs=1e-12)
    # the same budget with 128 bytes of copied tensors: one dimension fewer
    sel = select([layer], parse_recipe(f"spn_lora,size={2 ** -10}"), 2, fixed_bytes=128)
    assert int(sel.masks[0].sum()) == 7


def test_a_base_statistic_the_pipeline_did_not_compute_is_a_programming_error() -> None:
    layer = _exact_layer([1.0, 0.1], out=6, inn=4)     # no base norms, no subspace scales
    assert layer_scores(layer, parse_recipe("spn_lora,thr=0")).shape == (2,)   # needs none
    for method in ("spn_ckpt", "fro_ckpt", "subspace"):
        with pytest.raises(RuntimeError) as e:
            layer_scores(layer, parse_recipe(f"{method},thr=0"))
        assert str(e.value) == f"{method} needs a base statistic that was not computed for l6x4"
