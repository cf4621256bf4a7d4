"""The LoraExtractV2 node through the ComfyUI stub: inputs, file name, same file as V1, debug."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import pytest
import torch
from execution import run_node
from safetensors.torch import load_file

from lora_extract.memory.cache import ResidentCache
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.comfy_keymap import apply_lora
from tests.support.helpers import call_node, patched_pair

V1_DEFAULTS = dict(filename_prefix="loras/ComfyUI_extracted_lora", rank=8, lora_type="standard",
                   algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp16", bias_diff=True,
                   adaptive_param=0.15, clamp_quantile=True)


@pytest.fixture
def models():
    return patched_pair(width=48, seed=6)


def test_inputs_are_v1_plus_memory_knobs() -> None:
    v1 = NODE_CLASS_MAPPINGS["LoraExtract"].INPUT_TYPES()
    v2 = NODE_CLASS_MAPPINGS["LoraExtractV2"].INPUT_TYPES()
    req = v2["required"]
    assert list(req)[: len(v1["required"])] == list(v1["required"])
    assert v2["optional"] == v1["optional"]
    assert req["filename_prefix"][1]["default"] == "loras/ComfyUI_v2_extracted_lora"
    assert req["vram_usage_mode"][1]["options"] == ["conservative", "balanced", "aggressive", "maximum"]
    assert req["vram_usage_mode"][1]["default"] == "balanced"
    expect = {"blocks_in_gpu": (10, 0, 40), "batch_size": (4, 1, 8), "prefetch_ahead": (2, 0, 10),
              "memory_threshold": (0.85, 0.5, 0.95)}
    for name, (d, lo, hi) in expect.items():
        assert (req[name][1]["default"], req[name][1]["min"], req[name][1]["max"]) == (d, lo, hi)
    assert req["debug_mode"][1]["default"] is False
    assert NODE_CLASS_MAPPINGS["LoraExtractV2"].RETURN_NAMES == NODE_CLASS_MAPPINGS["LoraExtract"].RETURN_NAMES
    assert len(NODE_CLASS_MAPPINGS["LoraExtract"].RETURN_NAMES) == 3


def test_v2_node_writes_the_v1_file_with_its_name(comfy_dirs, models, monkeypatch) -> None:
    monkeypatch.setattr("lora_extract.memory.cache.RESIDENT", ResidentCache())
    base, tuned, patcher, tuned_patcher = models
    common = dict(finetuned_model=tuned_patcher, original_model=patcher, rank=6,
                  lora_type="adaptive_energy", adaptive_param=0.8)
    v1_path = run_node(NODE_CLASS_MAPPINGS["LoraExtract"], {**V1_DEFAULTS, **common})["result"][0]
    comfy.utils._reset()
    out = run_node(NODE_CLASS_MAPPINGS["LoraExtractV2"], {
        **V1_DEFAULTS, **common, "filename_prefix": "loras/ComfyUI_v2_extracted_lora",
        "vram_usage_mode": "aggressive", "blocks_in_gpu": 20, "batch_size": 6})
    path, text, chart = out["result"]
    assert os.path.basename(path) == (
        "ComfyUI_v2_extracted_lora_rank_adaptive_energy_0.8_fp16_aggressive_b20_bs6_00001_.safetensors")
    assert chart.shape[0] == 1 and chart.shape[-1] == 3
    a, b = load_file(v1_path), load_file(path)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=2e-3, atol=2e-4)
    model_sd = dict(base)  # demo keys already carry the diffusion_model. prefix
    _patched, unloaded = apply_lora(model_sd, b)
    assert unloaded == set()
    values = [v for _node, v, _t in comfy.utils._progress_log]
    assert values == list(range(1, len(base) + 1))
    assert "VRAM mode" not in text                       # debug off: the V1 report only


def test_debug_mode_reports_the_memory_log(comfy_dirs, models) -> None:
    base, tuned, patcher, tuned_patcher = models
    out = run_node(NODE_CLASS_MAPPINGS["LoraExtractV2"], dict(
        **V1_DEFAULTS, finetuned_model=tuned_patcher, original_model=patcher, debug_mode=True))
    path, text, _chart = out["result"]
    for needle in ("VRAM mode: balanced (budget n/a", "Blocks in GPU: 0 kept", "batch 1:",
                   "Extraction completed in", "Final VRAM: n/a", f"LoRA saved to: {path}"):
        assert needle in text, needle
    assert text in out["ui"]["text"][0]


def test_bad_mode_is_refused_before_any_file(comfy_dirs, models) -> None:
    from lora_extract.extract import ExtractionInputError

    base, tuned, patcher, tuned_patcher = models
    with pytest.raises(ExtractionInputError, match="vram_usage_mode 'fast'"):
        call_node(NODE_CLASS_MAPPINGS["LoraExtractV2"],
            **V1_DEFAULTS, finetuned_model=tuned_patcher, original_model=patcher,
            vram_usage_mode="fast")
    assert [f for _, _, fs in os.walk(str(comfy_dirs)) for f in fs] == []
