"""MODELs loaded by ComfyUI-GGUF (stand-in: tests/support/gguf_mimic) read as the float weights it
dequantizes: real shapes, no placeholder keys, patches applied, extraction at the optimum."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from lora_extract.extract import ExtractConfig, extract_lora  # noqa: E402
from lora_extract.extract.gguf_source import GGUFSource  # noqa: E402
from lora_extract.nodes.comfy_adapter import ComfyModelSource  # noqa: E402
from tests.support.paths import repo_module

write_gguf = repo_module("benchmarks/gguf_files.py").write_gguf

P = "diffusion_model."


def _pair(rng: np.random.Generator):
    base = {"blocks.0.q.weight": rng.standard_normal((128, 256)).astype(np.float32) * 0.05,
            "blocks.0.q.bias": rng.standard_normal(128).astype(np.float32) * 0.05,
            "blocks.0.ffn.weight": rng.standard_normal((256, 128)).astype(np.float32) * 0.05}
    tuned = {k: (v + 0.01 * (rng.standard_normal((v.shape[0], 6)) @ rng.standard_normal((6, v.shape[1])))
                 ).astype(np.float32) if v.ndim == 2 else v + 0.001 for k, v in base.items()}
    return base, tuned


@pytest.fixture
def files(tmp_path):
    base, tuned = _pair(np.random.default_rng(4))
    bp, tp = str(tmp_path / "base-Q8_0.gguf"), str(tmp_path / "tuned-Q4_K.gguf")
    write_gguf(bp, base, "Q8_0")
    write_gguf(tp, tuned, "Q6_K")
    return bp, tp


def _load(path: str):
    from tests.support.gguf_mimic.loader import load_gguf_model

    return load_gguf_model(path)


@pytest.mark.parametrize("own_dequantizer", [True, False])
def test_gguf_model_reads_as_the_file(files, own_dequantizer: bool, monkeypatch) -> None:
    """Keys without the ``temp`` placeholder, real (not byte) shapes, weights equal to the
    file's reference dequantization bit for bit: through ComfyUI-GGUF's dequantize_tensor
    (float32 setting), or our own when its module is not importable."""
    if not own_dequantizer:
        import tests.support.gguf_mimic.ops  # noqa: F401  (the class stays; its dequant module goes)
        monkeypatch.delitem(sys.modules, "tests.support.gguf_mimic.dequant")
    for path in files:
        patcher = _load(path)
        assert any(k.endswith("temp.weight") for k in patcher.model_state_dict())
        src, ref = ComfyModelSource(patcher, "m"), GGUFSource(path)
        assert sorted(src.keys()) == sorted(P + k for k in ref.keys())
        for k in ref.keys():
            assert src.shape(P + k) == ref.shape(k)
            got, want = src.get(P + k), ref.get(k)
            assert got.dtype == torch.float32 and torch.equal(got, want), k
            assert src.format_of(P + k) == ref.format_of(k)
            assert src.quantization_noise(P + k) == ref.quantization_noise(k)
        assert "GGUF Q8_0" in src.describe() or "GGUF Q6_K" in src.describe()


def test_patches_on_a_gguf_model_are_applied_once(files) -> None:
    """An upstream LoRA on a GGUF model: the patcher leaves the codes and hangs the patch on the
    weight; the source adds it once, whether or not the model was loaded."""
    patcher = _load(files[0]).clone()
    key = P + "blocks.0.q.weight"
    delta = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.01
    assert patcher.add_patches({key: ("diff", (delta,))}) == [key]
    expected = GGUFSource(files[0]).get("blocks.0.q.weight") + delta
    src = ComfyModelSource(patcher, "m")
    assert torch.allclose(src.get(key), expected, atol=1e-6, rtol=0)
    patcher.patch_weight_to_device(key)
    import comfy.utils

    assert len(comfy.utils.get_attr(patcher.model, key).patches) == 1
    assert torch.allclose(ComfyModelSource(patcher, "m").get(key), expected, atol=1e-6, rtol=0)


def test_extraction_from_gguf_models_is_optimal(files) -> None:
    base, tuned = ComfyModelSource(_load(files[0]), "base"), ComfyModelSource(_load(files[1]), "tuned")
    cfg = ExtractConfig(rank=8, output_dtype="fp32", clamp_quantile=None, algorithm="svd_linalg")
    res = extract_lora(base, tuned, cfg)
    for k in ("blocks.0.q", "blocks.0.ffn"):
        diff = (tuned.get(P + k + ".weight") - base.get(P + k + ".weight")).double()
        up, down = res.tensors[P + k + ".lora_up.weight"], res.tensors[P + k + ".lora_down.weight"]
        alpha = float(res.tensors.get(P + k + ".alpha", torch.tensor(float(up.shape[1]))))
        err = float(((up.double() @ down.double()) * (alpha / up.shape[1]) - diff).norm() / diff.norm())
        s = torch.linalg.svdvals(diff)
        opt = math.sqrt(float((s[8:] ** 2).sum() / (s ** 2).sum()))
        assert err <= 1.001 * opt + 1e-7, (k, err, opt)
