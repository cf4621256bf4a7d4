"""V2 (block-swap manager) gives V1's results: identical ranks, factors within float tolerance."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.batched import extract_matrices
from lora_extract.extract.layer import extract_matrix
from lora_extract.extract.sources import SafetensorsSource
from lora_extract.extract.synthetic import LayerSpec, demo_layers, make_pair, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MODES, MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed


def _layers() -> list[LayerSpec]:
    # The demo block plus repeated same-shaped layers, so batches hold same-shape groups.
    extra = [LayerSpec(f"diffusion_model.output_blocks.{b}.1.attn.to_{n}.weight", (40, 40), 12)
             for b in range(3) for n in "qkv"]
    return demo_layers(40) + extra


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2pair")
    return write_pair(str(folder), _layers(), seed=3, dtype=torch.bfloat16)


def _assert_same(v1, v2) -> None:
    assert list(v1.tensors) == list(v2.tensors)          # same keys, same order in the file
    for k, t in v1.tensors.items():
        assert t.dtype == v2.tensors[k].dtype and t.shape == v2.tensors[k].shape, k
        torch.testing.assert_close(v2.tensors[k].float(), t.float(), rtol=2e-3, atol=2e-4, msg=k)
    r1 = {r.key: (r.status, r.rank, r.reason) for r in v1.report.layers}
    r2 = {r.key: (r.status, r.rank, r.reason) for r in v2.report.layers}
    assert r1 == r2


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cfg", [
    ExtractConfig(rank=8),
    ExtractConfig(rank=12, lora_type="adaptive_energy", adaptive_param=0.9, algorithm="svd_lowrank",
                  lowrank_iters=4),
], ids=["exact", "lowrank_adaptive"])
def test_v2_equals_v1_every_mode(pair_files, mode: str, cfg: ExtractConfig) -> None:
    base, tuned = (SafetensorsSource(p) for p in pair_files)
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode=mode), cache=ResidentCache())
    _assert_same(v1, out.result)
    assert out.memory.plan.budget_bytes is None             # no accelerator: "n/a"
    assert "Final VRAM: n/a" in out.memory.format_debug()


@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_batched_svd_path_equals_v1(pair_files, algorithm: str) -> None:
    base, tuned = (SafetensorsSource(p) for p in pair_files)
    cfg = ExtractConfig(rank=6, algorithm=algorithm, lowrank_iters=3, lora_type="adaptive_quantile",
                        adaptive_param=0.6, output_dtype="fp32")
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode="maximum", batch_size=8),
                          batched_svd=True, cache=ResidentCache())
    _assert_same(v1, out.result)
    assert out.memory.batched_svd


@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (20, 6, 3, 3)])
def test_extract_matrices_matches_extract_matrix(algorithm: str, shape, gen) -> None:
    cfg = ExtractConfig(rank=5, algorithm=algorithm, lowrank_iters=2, clamp_quantile=0.99,
                        lora_type="adaptive_ratio", adaptive_param=0.2)
    diffs = [torch.randn(shape, generator=gen) @ torch.eye(shape[-1]) for _ in range(3)]
    diffs.append(torch.randn(7, 9, generator=gen))          # a different shape in the same call
    fros = [float(d.norm()) for d in diffs]
    seeds = [11, 12, 13, 14]
    alone = [extract_matrix(d.clone(), cfg, fro=f, generator=torch.Generator().manual_seed(s))
             for d, f, s in zip(diffs, fros, seeds, strict=True)]
    together = extract_matrices([d.clone() for d in diffs], cfg, fros,
                                [torch.Generator().manual_seed(s) for s in seeds])
    for a, b in zip(alone, together, strict=True):
        assert a.factors.rank == b.factors.rank
        torch.testing.assert_close(b.factors.up.float(), a.factors.up.float(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b.factors.down.float(), a.factors.down.float(), rtol=1e-3, atol=1e-4)
        assert b.rel_error == pytest.approx(a.rel_error, rel=1e-4, abs=1e-6)


def test_in_memory_sources_and_fp32(gen) -> None:
    base, tuned = make_pair(demo_layers(24), seed=9)
    b, t = StateDictSource(base), StateDictSource(tuned)
    cfg = ExtractConfig(rank=4, output_dtype="fp32", clamp_quantile=None)
    _assert_same(extract_lora(b, t, cfg),
                 extract_lora_streamed(b, t, cfg, MemoryOptions(), cache=ResidentCache()).result)
