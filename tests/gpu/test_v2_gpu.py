"""V2 on a CUDA device: pinned staging + side stream, batched SVD, residency. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, extract_lora
from lora_extract.extract.sources import SafetensorsSource
from lora_extract.extract.synthetic import LayerSpec, demo_layers, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MODES, MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    extra = [LayerSpec(f"diffusion_model.output_blocks.{b}.1.attn.to_{n}.weight", (256, 256), 12)
             for b in range(3) for n in "qkv"]
    folder = tmp_path_factory.mktemp("v2gpu")
    return write_pair(str(folder), demo_layers(128) + extra, seed=2, dtype=torch.float16)


def _reconstruction(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    up = tensors[prefix + ".lora_up.weight"].float()
    down = tensors[prefix + ".lora_down.weight"].float()
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_v2_cuda_equals_v1_cuda(pair_files, mode: str, algorithm: str) -> None:
    base, tuned = (SafetensorsSource(p) for p in pair_files)
    cfg = ExtractConfig(rank=8, algorithm=algorithm, device="cuda", output_dtype="fp32")
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode=mode), cache=ResidentCache())
    assert list(v1.tensors) == list(out.result.tensors)
    r1 = {r.key: r.rank for r in v1.report.layers}
    assert r1 == {r.key: r.rank for r in out.result.report.layers}
    for k in v1.tensors:
        if k.endswith(".lora_up.weight"):
            prefix = k[: -len(".lora_up.weight")]
            torch.testing.assert_close(_reconstruction(out.result.tensors, prefix),
                                       _reconstruction(v1.tensors, prefix), rtol=1e-3, atol=1e-4)
    assert out.memory.initial_vram is not None and out.memory.final_vram is not None


def test_second_run_takes_resident_blocks_from_the_cache(pair_files) -> None:
    base, tuned = (SafetensorsSource(p) for p in pair_files)
    cache = ResidentCache()
    opts = MemoryOptions(mode="maximum")
    first = extract_lora_streamed(base, tuned, ExtractConfig(rank=4, device="cuda"), opts, cache=cache)
    assert first.memory.cached_layers > 0 and cache.nbytes > 0
    second = extract_lora_streamed(base, tuned, ExtractConfig(rank=8, device="cuda"), opts, cache=cache)
    assert second.memory.cache_hits == first.memory.cached_layers
    assert second.memory.bytes_moved < first.memory.bytes_moved
    cache.clear()


def test_a_caller_on_another_stream_gets_the_same_result(pair_files) -> None:
    """The compute stream is the caller's current one (captured on its thread), not the default."""
    base, tuned = (SafetensorsSource(p) for p in pair_files)
    cfg = ExtractConfig(rank=8, device="cuda", output_dtype="fp32")
    ref = extract_lora_streamed(base, tuned, cfg, MemoryOptions(), cache=ResidentCache()).result
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(prefetch_ahead=3),
                              cache=ResidentCache()).result
    torch.cuda.synchronize()
    assert list(ref.tensors) == list(out.tensors)
    for k in ref.tensors:
        torch.testing.assert_close(out.tensors[k], ref.tensors[k], rtol=1e-4, atol=1e-5)
