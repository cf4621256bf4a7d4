"""With a size budget, layers left out as quantization noise take no part of it.

Oracle: the same budgeted run on the pair without the noise layer. Leaving a layer out must
leave every other layer exactly as if that layer had never been there: the same ranks, the
same tensors, the same used bytes.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lora_extract.extract.config import ExtractConfig
from lora_extract.extract.formats.dispatch import open_source
from lora_extract.extract.pipeline import extract_to_file
from lora_extract.extract.report import STATUS_LORA, STATUS_SKIPPED
from tests.support.quant_files import write_scaled_fp8

NOISE_KEY = "blocks.9.noise.weight"


def _weights(with_noise_layer: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    base, tuned = {}, {}
    for i in range(4):
        k = f"blocks.{i}.w.weight"
        base[k] = torch.randn(128, 96, generator=g) * 0.05
        change = torch.randn(128, 6, generator=g) @ torch.randn(6, 96, generator=g)
        tuned[k] = base[k] + change * (0.004 * (i + 1))
    noise_base = torch.randn(256, 256, generator=g) * 0.05
    if with_noise_layer:  # changed far below one fp8 step: after quantization only noise is left
        base[NOISE_KEY] = noise_base
        tuned[NOISE_KEY] = noise_base + 1e-6 * torch.randn(256, 256, generator=g)
    return base, tuned


def _run(tmp_path, name: str, with_noise_layer: bool, **cfg_kw):
    base, tuned = _weights(with_noise_layer)
    b, t = str(tmp_path / f"{name}_b.safetensors"), str(tmp_path / f"{name}_t.safetensors")
    write_scaled_fp8(b, base, {})
    write_scaled_fp8(t, tuned, {})
    out = str(tmp_path / f"{name}_lora.safetensors")
    cfg = ExtractConfig(rank=16, output_dtype="fp16", bias_diff=True, clamp_quantile=None,
                        algorithm="svd_linalg", **cfg_kw)
    report = extract_to_file(open_source(b), open_source(t), cfg, out)
    return report, load_file(out)


def test_noise_layers_left_out_take_no_part_of_the_budget(tmp_path) -> None:
    # 4 layers x rank 16 x (128 + 96) x 2 bytes = 28 KiB at the cap: 0.02 MiB forces a choice,
    # and the noise layer's full difference (256 x 256 x 2 = 128 KiB) alone is 6x the budget.
    budget = dict(target_size_mb=0.02, skip_noise_layers=True)
    with_noise, lora = _run(tmp_path, "with", True, **budget)
    without, oracle = _run(tmp_path, "without", False, **budget)

    (noise,) = [r for r in with_noise.layers if r.key == NOISE_KEY]
    assert noise.status == STATUS_SKIPPED and noise.at_noise_level
    assert not any(NOISE_KEY.removesuffix(".weight") in k for k in lora)
    assert with_noise.budget is not None and without.budget is not None
    assert with_noise.budget.used_bytes == without.budget.used_bytes
    assert with_noise.budget.used_bytes <= 0.02 * 2**20
    ranks = {r.key: r.rank for r in with_noise.layers if r.status == STATUS_LORA}
    assert ranks == {r.key: r.rank for r in without.layers if r.status == STATUS_LORA}
    assert len(ranks) == 4 and min(ranks.values()) >= 1 and sum(ranks.values()) < 4 * 16
    assert sorted(lora) == sorted(oracle)
    for k, v in oracle.items():
        assert torch.equal(lora[k], v), k


def test_without_skip_the_noise_layer_is_kept_and_budgeted(tmp_path) -> None:
    # The same pair with the layer kept: it competes for the budget, so the other layers get less.
    kept, _ = _run(tmp_path, "kept", True, target_size_mb=0.02)
    skipped, _ = _run(tmp_path, "skip", True, target_size_mb=0.02, skip_noise_layers=True)
    (noise,) = [r for r in kept.layers if r.key == NOISE_KEY]
    assert noise.at_noise_level and noise.status == STATUS_LORA
    others = [r for r in kept.layers if r.status == STATUS_LORA and r.key != NOISE_KEY]
    assert sum(r.rank for r in others) < sum(
        r.rank for r in skipped.layers if r.status == STATUS_LORA)
