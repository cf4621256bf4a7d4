"""The clamp as docs/output-format.md describes it, checked on the stored file against an independent SVD.

The docs: each rank component is clamped on its own. Column i of ``up`` is clipped to
``[-t, t]`` with t = 2 x the 0.99 quantile of the absolute entries of that column of the
balanced factor (``sqrt(S)`` on both sides, before the clamp); row i of ``down`` likewise with
its own quantile. Entries inside the limit are stored unchanged.

The oracle below takes its own float64 SVD of the difference (``torch.linalg.svd``), not the
pack's decomposition or clamp code.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_extract.extract import ExtractConfig, StateDictSource, extract_to_file
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_to_file_streamed

Q = 0.99          # the documented quantile
FACTOR = 2.0      # the documented "2 x the quantile"
RANK = 6
KEY = "diffusion_model.blocks.0.ff.weight"


def _difference_with_outliers(m: int, n: int, seed: int, spikes: bool) -> torch.Tensor:
    """A rank-6 difference whose singular vectors are Gaussian-like; with ``spikes``, some of
    them (in both U and V) have one entry far beyond the rest: the clamp's target."""
    g = torch.Generator().manual_seed(seed)
    u0 = torch.randn(m, RANK, generator=g, dtype=torch.float64)
    v0 = torch.randn(n, RANK, generator=g, dtype=torch.float64)
    if spikes:
        u0[11, 0], u0[40, 2], u0[7, 4] = 14.0, -12.0, 10.0
        v0[3, 1], v0[17, 0], v0[29, 3] = 13.0, -11.0, 12.0
    u, _ = torch.linalg.qr(u0)
    v, _ = torch.linalg.qr(v0)
    s = torch.tensor([9.0, 7.0, 5.0, 3.5, 2.0, 1.2], dtype=torch.float64)
    return ((u * s) @ v.T).float()


def _oracle(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced factors (alpha = rank) and each component's clip limit, from torch's float64 SVD."""
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    root = s[:RANK].sqrt()
    up, down = u[:, :RANK] * root, vh[:RANK] * root.unsqueeze(1)
    t_up = FACTOR * torch.quantile(up.abs(), Q, dim=0)
    t_down = FACTOR * torch.quantile(down.abs(), Q, dim=1)
    return up, down, t_up, t_down


def _extract(diff: torch.Tensor, tmp_path, route: str, clamp: float | None = Q) -> tuple[torch.Tensor, torch.Tensor, object]:
    base = {KEY: torch.zeros_like(diff)}
    tuned = {KEY: diff.clone()}
    cfg = ExtractConfig(rank=RANK, output_dtype="fp32", clamp_quantile=clamp)
    path = str(tmp_path / f"{route}.safetensors")
    if route == "v1":
        report = extract_to_file(StateDictSource(base), StateDictSource(tuned), cfg, path)
    else:
        report, _ = extract_to_file_streamed(StateDictSource(base), StateDictSource(tuned), cfg,
                                       MemoryOptions(mode="balanced"), path, cache=ResidentCache())
    sd = load_file(path)
    stem = "diffusion_model.blocks.0.ff"
    assert float(sd[f"{stem}.alpha"]) == RANK
    return sd[f"{stem}.lora_up.weight"].double(), sd[f"{stem}.lora_down.weight"].double(), report


def _align(stored_up: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """The oracle's factors with each component's sign matched to the stored one."""
    sign = torch.sign((stored_up * up).sum(0))
    return up * sign, down * sign.unsqueeze(1)


@pytest.mark.parametrize("route", ["v1", "v2"])
def test_both_stored_factors_within_their_own_limits(route: str, tmp_path) -> None:
    # Tall layer: a down entry is ~2.2x an up entry, so limits taken from the wrong factor (or
    # from both pooled) clip many ordinary entries, and skipping a factor leaves its spikes.
    # (Vectors need a few hundred entries: in a short one the 0.99 quantile is near its max.)
    diff = _difference_with_outliers(1500, 300, seed=1, spikes=True)
    stored_up, stored_down, _ = _extract(diff, tmp_path, route)
    up, down, t_up, t_down = _oracle(diff)
    up, down = _align(stored_up, up, down)
    tol = 1e-4
    assert bool((stored_up.abs() <= t_up * (1 + tol)).all()), "an up entry exceeds its column's limit"
    assert bool((stored_down.abs() <= t_down.unsqueeze(1) * (1 + tol)).all()), \
        "a down entry exceeds its row's limit"

    # Inside the limit: unchanged. Beyond it: exactly at the limit, with its sign.
    for stored, ref, t in ((stored_up, up, t_up.unsqueeze(0)), (stored_down, down, t_down.unsqueeze(1))):
        inside = ref.abs() < t * (1 - 1e-3)
        outside = ref.abs() > t * (1 + 1e-3)
        scale = float(ref.abs().max())
        assert float((stored - ref)[inside].abs().max()) <= 1e-4 * scale, "an entry inside its limit changed"
        assert int(outside.sum()) >= 2, "the constructed spikes must exceed the limit"
        limit = t.expand_as(ref)[outside] * torch.sign(ref[outside])
        torch.testing.assert_close(stored[outside], limit, rtol=1e-4, atol=0)


def test_clamp_bites_both_factors_and_the_report_counts_it(tmp_path) -> None:
    diff = _difference_with_outliers(1500, 300, seed=2, spikes=True)
    stored_up, stored_down, report = _extract(diff, tmp_path, "v1")
    _, _, t_up, t_down = _oracle(diff)
    # The spikes in both U and V were clipped: some entries of each factor sit at their limit.
    at_up = (stored_up.abs() - t_up).abs() <= 1e-4 * t_up
    at_down = (stored_down.abs() - t_down.unsqueeze(1)).abs() <= 1e-4 * t_down.unsqueeze(1)
    assert int(at_up.sum()) >= 3 and int(at_down.sum()) >= 3
    entry = next(r for r in report.layers if r.key == KEY)
    assert entry.clamped_entries == int(at_up.sum()) + int(at_down.sum())
    assert entry.rel_error > entry.rel_error_unclamped      # clipping a spike costs something


@pytest.mark.parametrize("route", ["v1", "v2"])
def test_clamp_leaves_outlier_free_factors_alone(route: str, tmp_path) -> None:
    # Gaussian-like singular vectors have no entry at 2x their 0.99 quantile: the default clamp
    # stores the truncated SVD itself, and adds exactly no error (what the docs promise).
    diff = _difference_with_outliers(600, 300, seed=3, spikes=False)
    stored_up, stored_down, report = _extract(diff, tmp_path, route)
    plain_up, plain_down, _ = _extract(diff, tmp_path, route + "-noclamp", clamp=None)
    assert torch.equal(stored_up, plain_up) and torch.equal(stored_down, plain_down)
    entry = next(r for r in report.layers if r.key == KEY)
    assert entry.clamped_entries == 0
    assert entry.rel_error - entry.rel_error_unclamped == 0.0
