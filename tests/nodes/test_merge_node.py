"""The LoraMerge node through the ComfyUI stub: names from the loras folder, block weights, errors."""

from __future__ import annotations

import comfy.model_management
import folder_paths
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.extract.errors import ExtractionInputError
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import call_node
from tests.support.resize_fixtures import kohya_layer, lora_pair, make_base, spectrum

PREFIX = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture
def comfy_dirs(tmp_path, gen):
    folder_paths._set_base_dir(str(tmp_path))
    comfy.model_management.interrupt_current_processing(False)
    make_base(str(tmp_path / "models" / "checkpoints"), gen, "sdxl_base.safetensors")
    sds = {}
    for name in ("a", "b"):
        sd: dict[str, torch.Tensor] = {}
        kohya_layer(sd, PREFIX, *lora_pair(32, (32,), spectrum(4, 0.5, 0.3), gen, 4.0), 4.0)
        save_file(sd, str(tmp_path / "models" / "loras" / f"{name}.safetensors"))
        sds[name] = sd
    yield tmp_path, sds


def _change(sd, prefix=PREFIX):
    up, down = sd[prefix + ".lora_up.weight"].double(), sd[prefix + ".lora_down.weight"].double()
    return (float(sd[prefix + ".alpha"]) / down.shape[0] * up @ down).numpy()


def test_node_merges_weighted_loras_with_block_weights(comfy_dirs) -> None:
    tmp_path, sds = comfy_dirs
    res = call_node(NODE_CLASS_MAPPINGS["LoraMerge"],
        loras="a:0.5\nb.safetensors:2", score_recipes="rank=8", output_dtype="fp32", device="cpu",
        verbose=True, block_weights="2:*attn1*=0.25", ckpt_name="sdxl_base.safetensors", name="mix")
    path = res["result"][0]
    assert path == str(tmp_path / "output" / "loras" / "mix_frolora1.00_rank8_th-inf.safetensors")
    want = 0.5 * _change(sds["a"]) + 0.5 * _change(sds["b"])
    np.testing.assert_allclose(_change(load_file(path)), want, atol=1e-6 * np.abs(want).max())
    assert "dim:   8->8" in res["result"][1]


def test_node_with_no_loras_is_a_clear_error(comfy_dirs) -> None:
    with pytest.raises(ExtractionInputError, match="loras is empty"):
        call_node(NODE_CLASS_MAPPINGS["LoraMerge"], loras=" \n ", score_recipes="rank=8", output_dtype="fp16",
                                                 device="cpu", verbose=False, ckpt_name="sdxl_base.safetensors")
