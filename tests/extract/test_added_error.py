""""Error added by clamp + dtype cast" reads exactly 0 when neither applies.

fp32 output and no clamp store the truncated SVD's own factors: nothing is added, on every
route (V1 and V2, exact and randomized SVD, per layer and batched).
"""

from __future__ import annotations

import pytest

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.report import STATUS_LORA
from lora_extract.extract.synthetic import demo_layers, make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed


@pytest.fixture(scope="module")
def pair() -> tuple[StateDictSource, StateDictSource]:
    base, tuned = make_pair(demo_layers(64), seed=5)
    return StateDictSource(base, "base"), StateDictSource(tuned, "tuned")


def _run(pair, cfg: ExtractConfig, route: str):
    base, tuned = pair
    if route == "v1":
        return extract_lora(base, tuned, cfg).report
    opts = MemoryOptions(mode="aggressive" if route == "v2-batched" else "balanced", batch_size=4)
    return extract_lora_streamed(base, tuned, cfg, opts, cache=ResidentCache(),
                           batched_svd=route == "v2-batched").result.report


@pytest.mark.parametrize("route", ["v1", "v2", "v2-batched"])
@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_no_clamp_fp32_adds_exactly_zero(pair, route: str, algorithm: str) -> None:
    cfg = ExtractConfig(rank=8, algorithm=algorithm, lowrank_iters=3, output_dtype="fp32",
                        clamp_quantile=None)
    report = _run(pair, cfg, route)
    lora = [r for r in report.layers if r.status == STATUS_LORA]
    assert lora
    for r in lora:
        assert r.rel_error - r.rel_error_unclamped == 0.0, r.key
    assert report.summary().mean_clamp_added_error == 0.0
    assert "error added by clamp + dtype cast: mean +0.00000" in report.format_text()


@pytest.mark.parametrize("route", ["v1", "v2"])
def test_a_lossy_cast_is_measured(pair, route: str) -> None:
    # The same run in fp16: the cast does add error, and the report says so.
    cfg = ExtractConfig(rank=8, output_dtype="fp16", clamp_quantile=None)
    report = _run(pair, cfg, route)
    added = [r.rel_error - r.rel_error_unclamped for r in report.layers if r.status == STATUS_LORA]
    assert all(a > 0 for a in added)
    assert report.summary().mean_clamp_added_error > 0
