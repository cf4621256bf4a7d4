"""The LoraResize node through the ComfyUI stub: folders, MODEL input, merge, interrupt."""

from __future__ import annotations

import os
import shutil

import comfy.model_management
import folder_paths
import pytest
import torch
from comfy.model_patcher import ModelPatcher
from execution import run_node
from safetensors.torch import load_file, save_file

from lora_extract.extract.errors import ExtractionInputError
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import call_node, module_from_state_dict
from tests.support.resize_fixtures import UNET, kohya_layer, lora_pair, make_base, spectrum

PREFIX = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture
def comfy_dirs(tmp_path, gen):
    folder_paths._set_base_dir(str(tmp_path))
    comfy.model_management.interrupt_current_processing(False)
    base_path, base_sd = make_base(str(tmp_path / "models" / "checkpoints"), gen, "sdxl_base.safetensors")
    for name in ("a", "b"):
        sd: dict[str, torch.Tensor] = {}
        kohya_layer(sd, PREFIX, *lora_pair(32, (32,), spectrum(8, 0.5, 0.3), gen, 4.0), 4.0)
        save_file(sd, str(tmp_path / "models" / "loras" / f"{name}.safetensors"))
    yield tmp_path, base_sd
    comfy.model_management.interrupt_current_processing(False)


def _node():
    return NODE_CLASS_MAPPINGS["LoraResize"]


def _inputs(**kw) -> dict:
    d = dict(lora_name="a.safetensors", score_recipes="spn_lora,thr=-1:spn_lora,size=0.001",
             output_dtype="fp16", device="default", verbose=True)
    d.update(kw)
    return d


def test_input_types_list_the_model_folders(comfy_dirs) -> None:
    types = NODE_CLASS_MAPPINGS["LoraResize"].INPUT_TYPES()
    assert types["required"]["lora_name"][1]["options"] == ["a.safetensors", "b.safetensors"]
    assert types["optional"]["ckpt_name"][1]["options"] == ["none", "sdxl_base.safetensors"]
    assert types["required"]["score_recipes"][1]["default"] == "fro_ckpt=1,thr=-3.5"


def test_node_resizes_against_a_checkpoint_file(comfy_dirs) -> None:
    tmp_path, _ = comfy_dirs
    res = call_node(_node(), **_inputs(ckpt_name="sdxl_base.safetensors"))
    paths = res["result"][0].split("\n")
    assert len(paths) == 2 and all(os.path.dirname(p) == str(tmp_path / "output" / "loras") for p in paths)
    assert os.path.basename(paths[0]) == "a_spnlora1.00_th-1.00.safetensors"
    lora = load_file(paths[0])
    assert lora[PREFIX + ".lora_down.weight"].shape == (2, 32)   # 0.3^i >= 0.1 for i = 0, 1
    assert "dim:   8->2" in res["result"][1]
    # base norms are cached in ComfyUI's user folder, never next to the checkpoint
    cached = os.listdir(tmp_path / "user" / "lora-extract" / "cache")
    assert len(cached) == 1 and cached[0].startswith("sdxl_base.safetensors.")
    assert os.listdir(tmp_path / "models" / "checkpoints") == ["sdxl_base.safetensors"]


def _scaled_delta(sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    up, down = sd[prefix + ".lora_up.weight"].double(), sd[prefix + ".lora_down.weight"].double()
    rank = down.shape[0]
    alpha = float(sd[prefix + ".alpha"]) if prefix + ".alpha" in sd else rank
    return alpha / rank * up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)


def test_node_with_model_input_and_merge_saved_to_loras(comfy_dirs) -> None:
    tmp_path, base_sd = comfy_dirs
    unet = {k[len(UNET):]: t for k, t in base_sd.items() if k.startswith(UNET)}
    root = module_from_state_dict(unet, prefix="diffusion_model.")
    patcher = ModelPatcher(root, torch.device("cpu"), torch.device("cpu"))
    loras = tmp_path / "models" / "loras"
    merged = 0.5 * _scaled_delta(load_file(str(loras / "a.safetensors")), PREFIX) \
        + 0.25 * _scaled_delta(load_file(str(loras / "b.safetensors")), PREFIX)
    sigma = torch.linalg.svdvals(merged)
    # Two independent rank-8 LoRAs: the weighted sum has rank 16 exactly.
    assert int((sigma > 1e-9 * sigma[0]).sum()) == 16
    keep = int((sigma >= 0.1 * sigma[0]).sum())       # spn_lora, thr=-1: sigma_i / sigma_0 >= 10^-1
    assert 2 < keep < 16
    res = run_node(NODE_CLASS_MAPPINGS["LoraResize"],
                   _inputs(model=patcher, merge="a:0.5,b:0.25", output_dtype="fp32",
                           score_recipes="spn_lora,thr=-12:spn_lora,thr=-1", save_to="models/loras"))
    full_path, cut_path = res["result"][0].split("\n")
    assert os.path.dirname(full_path) == str(loras)
    assert os.path.basename(full_path).startswith("a0.5+b0.25_spnlora1.00_th-12.00")
    full, cut = load_file(full_path), load_file(cut_path)
    # Nothing cut: the file reproduces the weighted sum itself, with all 16 dimensions.
    assert full[PREFIX + ".lora_down.weight"].shape[0] == 16
    torch.testing.assert_close(_scaled_delta(full, PREFIX), merged, rtol=0, atol=1e-6 * float(sigma[0]))
    # Cut at 10% of the top sigma: exactly those dimensions, and the optimal (Eckart-Young) error.
    assert cut[PREFIX + ".lora_down.weight"].shape[0] == keep
    err = float(torch.linalg.matrix_norm(_scaled_delta(cut, PREFIX) - merged))
    optimal = float(sigma[keep:].square().sum().sqrt())
    assert abs(err - optimal) <= 1e-6 * float(sigma[0])


def test_node_errors_are_clear(comfy_dirs) -> None:
    with pytest.raises(ExtractionInputError, match="no base model"):
        call_node(_node(), **_inputs())
    with pytest.raises(ExtractionInputError, match="not in the loras folder"):
        call_node(_node(), **_inputs(merge="missing:1", ckpt_name="sdxl_base.safetensors"))
    with pytest.raises(ExtractionInputError, match="exactly one of thr= and size="):
        call_node(_node(), **_inputs(score_recipes="fro_ckpt", ckpt_name="sdxl_base.safetensors"))


def test_interrupt_stops_between_layers_without_files(comfy_dirs, monkeypatch) -> None:
    """Cancel pressed while the first of three layers is decomposed: the run stops before the
    second one, and no file is written."""
    tmp_path, _ = comfy_dirs
    shutil.rmtree(tmp_path / "output", ignore_errors=True)
    gen = torch.Generator().manual_seed(9)
    sd: dict[str, torch.Tensor] = {}
    for prefix, (out, inn) in {PREFIX: (32, 32),
                               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (32, 48),
                               "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj": (128, 32)}.items():
        kohya_layer(sd, prefix, *lora_pair(out, (inn,), spectrum(4, 0.5, 0.5), gen, 4.0), 4.0)
    save_file(sd, str(tmp_path / "models" / "loras" / "three.safetensors"))
    import lora_extract.resize.pipeline as pipeline

    real, seen = pipeline.decompose_layer, []

    def decompose_layer(prefix, *a, **k):
        seen.append(prefix)
        if len(seen) == 1:
            comfy.model_management.interrupt_current_processing(True)   # Cancel, mid-layer
        return real(prefix, *a, **k)

    monkeypatch.setattr(pipeline, "decompose_layer", decompose_layer)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(NODE_CLASS_MAPPINGS["LoraResize"],
                 _inputs(lora_name="three.safetensors", ckpt_name="sdxl_base.safetensors"))
    assert len(seen) == 1                 # the first layer finished, the second never started
    out = tmp_path / "output" / "loras"
    assert not out.exists() or os.listdir(out) == []


def test_progress_text_goes_to_the_resize_node(comfy_dirs) -> None:
    from server import PromptServer

    server = PromptServer._reset()
    run_node(NODE_CLASS_MAPPINGS["LoraResize"], _inputs(ckpt_name="sdxl_base.safetensors"), node_id="11")
    texts = server.progress_texts()
    assert texts and {nid for nid, _ in texts} == {"11"}
    assert texts[0][1] == f"1/3: {PREFIX}"     # one layer, then the two recipes
