"""Interrupts and failures inside the LoraExtract and LoraExtractV2 nodes (through the ComfyUI stub).

ComfyUI 0.3.64 derives ``InterruptProcessingException`` from ``Exception``; newer ComfyUI derives
it from ``BaseException``. Both must reach ComfyUI's executor unchanged, within one layer of the
cancel, with accelerator memory released and no file left behind.
"""

from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch

import lora_extract.extract.layer_work as layer_work
from lora_extract.extract import ExtractionInputError
from tests.nodes.test_extract_node import _run
from tests.support.fault_injection import NewComfyInterrupt, OnNthCall, files_under
from tests.support.helpers import call_node, patched_pair


@pytest.fixture(scope="module")
def patchers():
    return patched_pair(width=24, seed=8)[2:]


def _run_node(node_name: str, inputs: dict) -> dict:
    from lora_extract.nodes import NODE_CLASS_MAPPINGS

    if node_name == "LoraExtract":
        return _run(inputs)
    defaults = dict(filename_prefix="loras/v2", rank=8, lora_type="standard", algorithm="svd_linalg",
                    lowrank_iters=7, output_dtype="fp16", bias_diff=True, adaptive_param=0.15,
                    clamp_quantile=True, batch_size=3)
    return call_node(NODE_CLASS_MAPPINGS[node_name], **{**defaults, **inputs})


@pytest.mark.parametrize("node_name", ["LoraExtract", "LoraExtractV2"])
@pytest.mark.parametrize("exc_type", [mm.InterruptProcessingException, NewComfyInterrupt],
                         ids=["comfy-0.3.64-Exception", "newer-comfy-BaseException"])
@pytest.mark.parametrize("cancel_at", [1, 7])
def test_cancel_is_honoured_within_one_layer(comfy_dirs, patchers, monkeypatch, exc_type, cancel_at: int,
                                             node_name: str) -> None:
    patcher, tuned_patcher = patchers
    monkeypatch.setattr(mm, "InterruptProcessingException", exc_type)
    if node_name == "LoraExtractV2":
        import lora_extract.memory.layer_store as layer_store
        from lora_extract.memory.cache import ResidentCache

        monkeypatch.setattr("lora_extract.memory.cache.RESIDENT", ResidentCache())

    def press_cancel(*_a, **_k) -> None:
        mm.interrupt_current_processing(True)  # the user presses Cancel during this layer

    count_layers = OnNthCall(layer_work.process_pair, cancel_at, press_cancel)
    monkeypatch.setattr(layer_work, "process_pair", count_layers)
    if node_name == "LoraExtractV2":
        monkeypatch.setattr(layer_store, "process_pair", count_layers)
    empties = mm._soft_empty_cache_calls
    with pytest.raises(exc_type):
        _run_node(node_name, dict(finetuned_model=tuned_patcher, original_model=patcher))
    assert count_layers.calls == cancel_at      # no further layer was started
    assert mm._soft_empty_cache_calls > empties  # memory released in the node's finally
    assert files_under(comfy_dirs) == []


def test_error_in_a_layer_releases_memory_and_writes_nothing(comfy_dirs, patchers, monkeypatch) -> None:
    patcher, _ = patchers
    broken = patcher.clone()
    key = "diffusion_model.blocks.0.self_attn.qkv.weight"
    bad = torch.zeros(patcher.model_state_dict()[key].shape)
    bad[0, 0] = float("nan")
    broken.add_patches({key: (bad,)})
    empties = mm._soft_empty_cache_calls
    with pytest.raises(ExtractionInputError, match=r"qkv\.weight.*finetuned_model.*NaN or Inf"):
        _run(dict(finetuned_model=broken, original_model=patcher))
    assert mm._soft_empty_cache_calls > empties
    assert files_under(comfy_dirs) == []
