"""Parameters only in the fine-tuned model: stored as ComfyUI set_weight patches, or reported
with the reason when ComfyUI's loader could not apply them."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.new_tensors import set_weight_key
from lora_extract.extract.synthetic import LayerSpec, make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed

LAYERS = [LayerSpec("diffusion_model.blocks.0.q.weight", (16, 16), 4),
          LayerSpec("diffusion_model.blocks.0.q.bias", (16,), 1),
          LayerSpec("diffusion_model.blocks.0.modulation", (1, 6, 16), 1)]
G = torch.Generator().manual_seed(9)
NEW = {
    "diffusion_model.blocks.0.new_proj.weight": torch.randn(8, 16, generator=G),
    "diffusion_model.blocks.0.new_proj.bias": torch.randn(8, generator=G),
    "diffusion_model.blocks.0.q.scale": torch.randn(16, generator=G),   # bare parameter on a leaf module
    "diffusion_model.blocks.gate": torch.randn(4, generator=G),              # on a non-leaf module
    "text_encoders.clip_l.transformer.text_model.extra.weight": torch.randn(4, 4, generator=G),
    "text_encoders.clip_l.transformer.text_model.extra.bias": torch.randn(4, generator=G),
}
TE = [LayerSpec("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                (8, 8), 2)]


def _models():
    base, tuned = make_pair(LAYERS + TE, seed=2)
    return base, {**tuned, **NEW}


def test_set_weight_keys_are_comfyuis_generic_names() -> None:
    assert set_weight_key("blocks.0.new_proj.weight") == "diffusion_model.blocks.0.new_proj.set_weight"
    assert set_weight_key("blocks.0.new_proj.bias") == "diffusion_model.blocks.0.new_proj.bias.set_weight"
    assert set_weight_key("text_encoders.clip_l.x.weight") == "text_encoders.clip_l.x.set_weight"
    assert set_weight_key("text_encoders.clip_l.x.bias") is None


@pytest.mark.parametrize("engine", ["v1", "v2", "budget"])
def test_new_tensors_stored_exactly_or_flagged(engine: str) -> None:
    base, tuned = _models()
    cfg = ExtractConfig(rank=4, output_dtype="fp32",
                        target_size_mb=0.05 if engine == "budget" else 0.0)
    b, t = StateDictSource(base, "base"), StateDictSource(tuned, "tuned")
    res = (extract_lora_streamed(b, t, cfg, MemoryOptions(), cache=ResidentCache()).result
           if engine == "v2" else extract_lora(b, t, cfg))
    expect = {"diffusion_model.blocks.0.new_proj.set_weight": "diffusion_model.blocks.0.new_proj.weight",
              "diffusion_model.blocks.0.new_proj.bias.set_weight": "diffusion_model.blocks.0.new_proj.bias",
              "diffusion_model.blocks.0.q.scale.set_weight": "diffusion_model.blocks.0.q.scale",
              "text_encoders.clip_l.transformer.text_model.extra.set_weight":
                  "text_encoders.clip_l.transformer.text_model.extra.weight"}
    got = {k for k in res.tensors if k.endswith(".set_weight")}
    assert got == set(expect)
    for out_key, src_key in expect.items():
        assert torch.equal(res.tensors[out_key], NEW[src_key])
    by_key = {r.key: r for r in res.report.layers}
    assert len(res.report.layers) == len(set(base) | set(tuned))
    for src_key in expect.values():
        assert by_key[src_key].status == "diff" and by_key[src_key].rel_error == 0.0
        assert by_key[src_key].reason.startswith("only in the fine-tuned model: stored as")
    assert "sub-modules" in by_key["diffusion_model.blocks.gate"].reason
    assert "only .weight" in by_key["text_encoders.clip_l.transformer.text_model.extra.bias"].reason
    assert any("stored as set_weight" in n for n in res.report.notes)


def test_fp16_output_error_is_the_cast_error() -> None:
    base, tuned = _models()
    res = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(rank=4))
    w = NEW["diffusion_model.blocks.0.new_proj.weight"]
    entry = next(r for r in res.report.layers if r.key == "diffusion_model.blocks.0.new_proj.weight")
    expect = float((w.half().double() - w.double()).norm() / w.double().norm())
    assert entry.rel_error == pytest.approx(expect, rel=1e-4)


def test_skip_option_and_model_sources_leave_them_out() -> None:
    base, tuned = _models()
    res = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=4, new_tensors="skip"))
    assert not any(k.endswith(".set_weight") for k in res.tensors)
    reasons = {r.key: r.reason for r in res.report.layers}
    assert all(reasons[k] == "only in the fine-tuned model (new_tensors is skip)" for k in NEW)

    class ModelSource(StateDictSource):     # like a ComfyUI MODEL: its keys are all its parameters
        lists_every_parameter = True

    res = extract_lora(ModelSource(base), StateDictSource(tuned), ExtractConfig(rank=4))
    assert not any(k.endswith(".set_weight") for k in res.tensors)
    assert all("nowhere to put it" in r.reason for r in res.report.layers if r.key in NEW)


def test_selection_applies_to_new_tensors() -> None:
    base, tuned = _models()
    res = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=4, exclude="*new_proj*"))
    assert "diffusion_model.blocks.0.new_proj.set_weight" not in res.tensors
    assert "diffusion_model.blocks.0.q.scale.set_weight" in res.tensors
    reasons = {r.key: r.reason for r in res.report.layers}
    assert reasons["diffusion_model.blocks.0.new_proj.weight"] == "left out by exclude pattern '*new_proj*'"


def test_resize_and_merge_copy_set_weight_unchanged(tmp_path) -> None:
    """A set patch ignores the strength in ComfyUI, so merge weights do not scale it either."""
    from safetensors.torch import load_file, save_file

    from tests.resize.test_pipeline import ATTN1, _resize
    from tests.support.resize_fixtures import lora_pair, make_base, spectrum

    gen = torch.Generator().manual_seed(4)
    base_path, _ = make_base(str(tmp_path), gen)
    prefix = "diffusion_model." + ATTN1
    up, down = lora_pair(32, (32,), spectrum(4, 0.3), gen, 4.0)
    value = torch.randn(8, 32, generator=gen)
    save_file({f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
               f"{prefix}.alpha": torch.tensor(4.0),
               "diffusion_model.new_proj.set_weight": value}, str(tmp_path / "a.safetensors"))
    report = _resize(base_path, f"{tmp_path / 'a'}:0.5", "spn_lora,thr=-20", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    torch.testing.assert_close(out["diffusion_model.new_proj.set_weight"].float(), value,
                               atol=1e-3, rtol=1e-3)
