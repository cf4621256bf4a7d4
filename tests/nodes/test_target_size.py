"""``target_size_mb`` on LoraExtract and LoraExtractV2 through the ComfyUI stub."""

from __future__ import annotations

import os

import comfy.utils
import pytest

from lora_extract.extract import ExtractionInputError
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import call_node, patched_pair

BASE = dict(filename_prefix="loras/sized", rank=16, lora_type="standard",
            algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp16", bias_diff=True,
            adaptive_param=0.15, clamp_quantile=True)


@pytest.mark.parametrize("node_id", ["LoraExtract", "LoraExtractV2"])
def test_node_writes_a_file_named_by_its_size_within_the_budget(comfy_dirs, node_id) -> None:
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]["target_size_mb"]
    assert spec[0] == "FLOAT" and spec[1]["default"] == 0.0 and spec[1]["min"] == 0.0
    _base, _tuned, patcher, tuned_patcher = patched_pair(width=48, seed=5)
    comfy.utils._reset()
    out = call_node(NODE_CLASS_MAPPINGS[node_id],
        finetuned_model=tuned_patcher, original_model=patcher, target_size_mb=0.02, **BASE)
    path, text, _chart = out["result"]
    name = os.path.basename(path)
    assert name.startswith("sized_size_0.02mb_fp16_") and name.endswith("_00001_.safetensors")
    assert "size budget: 0.020 MiB" in text and "<- this file" in text
    assert "implied threshold" in text
    header = os.path.getsize(path) - int(text.split("tensors ")[1].split()[0])
    assert os.path.getsize(path) <= 0.02 * 2**20 + header


def test_node_refuses_a_budget_with_full(comfy_dirs) -> None:
    _base, _tuned, patcher, tuned_patcher = patched_pair(width=48, seed=5)
    with pytest.raises(ExtractionInputError, match="lora_type 'full'"):
        call_node(NODE_CLASS_MAPPINGS["LoraExtract"],
            finetuned_model=tuned_patcher, original_model=patcher, target_size_mb=1.0,
            **{**BASE, "lora_type": "full"})
