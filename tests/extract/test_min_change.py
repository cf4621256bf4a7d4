"""Skip unchanged layers: ||dW|| and ||dW||/||W|| thresholds, checked against norms computed
here in float64; the quantized default threshold from the pair's noise floor."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.change_threshold import NOISE_FACTOR, small_change_reason
from lora_extract.extract.pairing import KeyPair, PairPlan
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed

SCALES = {"a": 1e-1, "b": 1e-2, "c": 1e-3, "d": 1e-4}   # size of each layer's change


def _pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base, tuned = {}, {}
    for name, s in SCALES.items():
        k = f"diffusion_model.{name}.weight"
        w = torch.randn(32, 16, generator=g)
        base[k] = w
        tuned[k] = w + s * torch.randn(32, 16, generator=g)
    return base, tuned


def _norms(base, tuned):
    return {k: (float((tuned[k].double() - base[k].double()).norm()),
                float(base[k].double().norm())) for k in base}


@pytest.mark.parametrize("engine", ["v1", "v2", "budget"])
@pytest.mark.parametrize("rel,absolute", [(3e-3, 0.0), (0.0, 0.2), (3e-3, 0.05)])
def test_skipped_layers_are_those_below_the_thresholds(engine: str, rel: float,
                                                       absolute: float) -> None:
    base, tuned = _pair()
    norms = _norms(base, tuned)
    expect = {k for k, (d, w) in norms.items() if d < absolute or d < rel * w}
    assert expect and expect != set(norms)   # the thresholds split the layers
    cfg = ExtractConfig(rank=4, output_dtype="fp32", min_change_rel=rel, min_change_abs=absolute,
                        target_size_mb=0.01 if engine == "budget" else 0.0)
    b, t = StateDictSource(base), StateDictSource(tuned)
    res = (extract_lora_streamed(b, t, cfg, MemoryOptions(), cache=ResidentCache()).result
           if engine == "v2" else extract_lora(b, t, cfg))
    skipped = {r.key: r for r in res.report.layers if r.status == "skipped"}
    assert set(skipped) == expect
    for k, r in skipped.items():
        d, w = norms[k]
        assert r.reason.startswith("change below threshold")
        assert r.change == pytest.approx(d, rel=1e-5)
        assert f"{d:.4g}" in r.reason
        assert not any(x.startswith(k[: -len(".weight")] + ".") for x in res.tensors)
    assert res.report.skipped_reasons() == {"change below threshold": len(expect)}
    for k in set(norms) - expect:
        assert k[: -len(".weight")] + ".lora_up.weight" in res.tensors


def test_quantized_default_threshold_follows_the_noise_floor() -> None:
    plan = PairPlan()
    pair = KeyPair("k", "k", "x.weight", (4, 4))
    cfg = ExtractConfig(min_change_rel=1e-9)     # skipping on, no absolute threshold given
    plan.noise_floor = lambda kp: 0.1            # what a quantized pair's plan gives
    plan.base_norm = lambda kp: 1.0
    assert small_change_reason(pair, NOISE_FACTOR * 0.1 * 0.99, cfg, plan).endswith(
        "(the quantization noise floor x1.5)")
    assert small_change_reason(pair, NOISE_FACTOR * 0.1 * 1.01, cfg, plan) is None
    # A threshold of the user's own replaces the default; unquantized pairs have none.
    assert small_change_reason(pair, 0.14, ExtractConfig(min_change_abs=0.01), plan) is None
    plan.noise_floor = lambda kp: None
    assert small_change_reason(pair, 1e-6, cfg, plan) is None
    # Skipping off: nothing is skipped, whatever the floor.
    plan.noise_floor = lambda kp: 0.1
    assert small_change_reason(pair, 1e-6, ExtractConfig(), plan) is None


def test_thresholds_must_be_finite_and_non_negative() -> None:
    from lora_extract.extract import ExtractionInputError
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ExtractionInputError, match="min_change_rel"):
            ExtractConfig(min_change_rel=bad).validate()


def test_everything_below_the_threshold_is_an_error_naming_the_thresholds() -> None:
    from lora_extract.extract import NothingToExtract
    base, tuned = _pair()
    with pytest.raises(NothingToExtract, match=r"4 parameter\(s\) differ .* change below "
                       r"threshold: .* lower min_change_rel / min_change_abs to store them"):
        extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(min_change_abs=1e3))
