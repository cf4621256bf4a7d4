"""V1 on a CUDA device gives the CPU's ranks and factors. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import demo_layers, make_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("lora_type", ["standard", "adaptive_energy", "adaptive_ratio"])
@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_cuda_matches_cpu(algorithm: str, lora_type: str) -> None:
    # Spectra decay by 0.8 per component, rank 6 stays inside them: well-separated singular
    # values, so the devices' singular vectors must agree (no near-ties to rotate within).
    base, tuned = make_pair(demo_layers(96), seed=11)
    param = {"standard": 0.0, "adaptive_energy": 0.9, "adaptive_ratio": 0.3}[lora_type]
    results = {}
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(rank=6, algorithm=algorithm, lora_type=lora_type,
                            adaptive_param=param, device=device, output_dtype="fp32")
        results[device] = extract_lora(StateDictSource(base), StateDictSource(tuned), cfg)
    cpu, gpu = results["cpu"], results["cuda"]
    assert [r.rank for r in cpu.report.layers] == [r.rank for r in gpu.report.layers]
    assert list(cpu.tensors) == list(gpu.tensors)
    for k in cpu.tensors:
        # Sign-canonical factors: the devices' SVDs agree up to rounding, signs included.
        torch.testing.assert_close(gpu.tensors[k], cpu.tensors[k], rtol=2e-3, atol=2e-4)
