"""The LoraExtract node end to end through the ComfyUI stub."""

from __future__ import annotations

import os

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import pytest
import torch
from execution import run_node
from safetensors.torch import load_file

from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.comfy_keymap import apply_lora
from tests.support.helpers import patched_pair


@pytest.fixture
def models():
    return patched_pair(width=48, seed=5)


def _run(node_inputs: dict) -> dict:
    defaults = dict(filename_prefix="loras/ComfyUI_extracted_lora", rank=8, lora_type="standard",
                    algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp16", bias_diff=True,
                    adaptive_param=0.15, clamp_quantile=True)
    defaults.update(node_inputs)
    # As ComfyUI runs it: under inference_mode, with the progress hook that raises Cancel.
    return run_node(NODE_CLASS_MAPPINGS["LoraExtract"], defaults)


def test_input_definitions_match_the_documented_node() -> None:
    spec = NODE_CLASS_MAPPINGS["LoraExtract"].INPUT_TYPES()
    req = spec["required"]
    assert list(req) == ["filename_prefix", "rank", "lora_type",
                         "algorithm", "lowrank_iters", "output_dtype", "bias_diff", "adaptive_param",
                         "clamp_quantile"]
    # The documented MODEL pair, plus the CLIP pair: optional, since either pair alone is enough.
    opt = spec["optional"]
    assert list(opt)[:5] == ["finetuned_model", "original_model", "finetuned_clip", "original_clip",
                             "text_encoder_rank"]
    assert [opt[k][0] for k in list(opt)[:4]] == ["MODEL", "MODEL", "CLIP", "CLIP"]
    assert opt["text_encoder_rank"][1].items() >= {"default": 0, "min": 0, "max": 4096}.items()
    assert req["rank"][1].items() >= {"default": 8, "min": 1, "max": 4096}.items()
    assert req["lora_type"][0] == "COMBO"
    assert req["lora_type"][1]["options"] == ["standard", "full", "adaptive_ratio", "adaptive_quantile",
                                   "adaptive_energy", "adaptive_fro"]
    assert req["algorithm"][1]["options"] == ["svd_linalg", "svd_lowrank"]
    assert req["lowrank_iters"][1]["default"] == 8
    assert req["output_dtype"][1]["options"] == ["fp16", "bf16", "fp32"]
    assert req["adaptive_param"][1].items() >= {"default": 0.15, "min": 0.0, "max": 1.0}.items()
    assert req["filename_prefix"][1]["default"] == "loras/ComfyUI_extracted_lora"
    for spec in list(req.values()) + list(NODE_CLASS_MAPPINGS["LoraExtract"].INPUT_TYPES()["optional"].values()):
        assert spec[1].get("tooltip")


def test_node_extracts_patched_model_and_file_loads(comfy_dirs, models) -> None:
    base, tuned, patcher, tuned_patcher = models
    comfy.utils._reset()
    out = _run(dict(finetuned_model=tuned_patcher, original_model=patcher, rank=16, conv_rank=16,
                    output_dtype="fp32", clamp_quantile=False))
    path, text, _chart = out["result"]
    assert os.path.dirname(path) == os.path.join(str(comfy_dirs), "output", "loras")
    assert os.path.basename(path) == "ComfyUI_extracted_lora_rank_16_fp32_00001_.safetensors"
    assert "saved" in out["ui"]["text"][0] and "layers:" in text
    lora = load_file(path)
    model_sd = {"diffusion_model." + k if not k.startswith("diffusion_model.") else k: v for k, v in base.items()}
    patched, unloaded = apply_lora(model_sd, lora)
    assert unloaded == set()
    # rank 16 >= the rank of every constructed delta except the noise: close to tuned
    for k, v in tuned.items():
        d = float((v - base[k]).norm())
        if d:
            assert float((patched[k] - v).norm()) / d < 0.1, k
    # The progress bar went layer by layer to the end.
    values = [v for _node, v, _t in comfy.utils._progress_log]
    assert values == list(range(1, len(base) + 1))


def test_counter_never_overwrites(comfy_dirs, models) -> None:
    base, tuned, patcher, tuned_patcher = models
    p1 = _run(dict(finetuned_model=tuned_patcher, original_model=patcher))["result"][0]
    p2 = _run(dict(finetuned_model=tuned_patcher, original_model=patcher))["result"][0]
    assert p1.endswith("_00001_.safetensors") and p2.endswith("_00002_.safetensors")
    p3 = _run(dict(finetuned_model=tuned_patcher, original_model=patcher, lora_type="adaptive_ratio"))["result"][0]
    # One counter per prefix, as ComfyUI numbers its outputs.
    assert os.path.basename(p3) == "ComfyUI_extracted_lora_rank_adaptive_ratio_0.15_fp16_00003_.safetensors"


def test_upstream_lora_patches_are_included(comfy_dirs, models) -> None:
    base, tuned, patcher, tuned_patcher = models
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    up = torch.randn(48, 2) * 0.1
    down = torch.randn(2, 48) * 0.1
    lora_sd = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": up,
               "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight": down,
               "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(2.0)}
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with_lora = patcher.clone()
    with_lora.add_patches(comfy.lora.load_lora(lora_sd, key_map), 1.0)
    out = _run(dict(finetuned_model=with_lora, original_model=patcher, rank=2, output_dtype="fp32",
                    clamp_quantile=False))
    lora = load_file(out["result"][0])
    rec = lora[key[: -len(".weight")] + ".lora_up.weight"] @ lora[key[: -len(".weight")] + ".lora_down.weight"]
    torch.testing.assert_close(rec, up @ down, rtol=1e-4, atol=1e-5)
    # Only the patched layer differs.
    assert sum(k.endswith(".lora_up.weight") for k in lora) == 1


def test_save_to_models_loras(comfy_dirs, models) -> None:
    base, tuned, patcher, tuned_patcher = models
    path = _run(dict(finetuned_model=tuned_patcher, original_model=patcher, save_to="models/loras"))["result"][0]
    assert os.path.dirname(path) == folder_paths.get_folder_paths("loras")[0]
    assert os.path.basename(path) in folder_paths.get_filename_list("loras")


def test_each_save_to_choice_lands_in_its_folder(comfy_dirs, models) -> None:
    # The choices as the widget offers them: each one the user can pick goes where it says.
    _base, _tuned, patcher, tuned_patcher = models
    choices = NODE_CLASS_MAPPINGS["LoraExtract"].INPUT_TYPES()["optional"]["save_to"][1]["options"]
    folders = {c: os.path.dirname(_run(dict(finetuned_model=tuned_patcher, original_model=patcher,
                                             save_to=c))["result"][0]) for c in choices}
    assert folders == {"output": os.path.join(folder_paths.get_output_directory(), "loras"),
                       "models/loras": folder_paths.get_folder_paths("loras")[0]}


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "loras/../../x", "a\x00b"])
def test_prefix_outside_output_is_refused(comfy_dirs, models, prefix: str) -> None:
    base, tuned, patcher, tuned_patcher = models
    from lora_extract.extract import ExtractionInputError

    with pytest.raises(ExtractionInputError):
        _run(dict(finetuned_model=tuned_patcher, original_model=patcher, filename_prefix=prefix))
    written = [os.path.join(d, f) for d, _, fs in os.walk(str(comfy_dirs)) for f in fs]
    assert written == []


def test_interrupt_is_honoured_and_leaves_no_file(comfy_dirs, models, monkeypatch) -> None:
    base, tuned, patcher, tuned_patcher = models
    import lora_extract.extract.layer_work as layer_work

    real = layer_work.process_pair
    count = 0

    def interrupting(*a, **k):
        nonlocal count
        count += 1
        if count == 3:
            comfy.model_management.interrupt_current_processing(True)
        return real(*a, **k)

    monkeypatch.setattr(layer_work, "process_pair", interrupting)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(dict(finetuned_model=tuned_patcher, original_model=patcher))
    assert count == 3  # stopped at the next layer boundary
    written = [f for _, _, fs in os.walk(str(comfy_dirs)) for f in fs]
    assert written == []
