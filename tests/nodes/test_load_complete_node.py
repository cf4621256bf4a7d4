"""The "Load LoRA (complete)" node against the ComfyUI stub: LoraLoader's patches, the same way,
plus the non-leaf parameters ComfyUI's load skips, restored on unload and on a strength change."""

from __future__ import annotations

import os

import comfy.sd
import pytest
import torch
from comfy.sd import CLIP, ClipTarget
from safetensors.torch import save_file

from lora_extract.extract import ExtractionInputError
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import call_node, make_toy_patcher

P = "diffusion_model."
NAME = "toy_lora.safetensors"


@pytest.fixture
def setup(comfy_dirs, gen):
    patcher = make_toy_patcher(seed=3)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    lora = {
        P + "pos_embed.diff": torch.randn(1, 4, 6, generator=gen),         # non-leaf: skipped by ComfyUI
        P + "lin.lora_up.weight": torch.randn(6, 2, generator=gen),
        P + "lin.lora_down.weight": torch.randn(2, 8, generator=gen),
        P + "lin.alpha": torch.tensor(1.0),
        P + "lin.diff_b": torch.randn(6, generator=gen),
        P + "norm.diff": torch.randn(6, generator=gen),
        "text_encoders.enc.diff": torch.randn(3, 3, generator=gen),       # for the CLIP
    }
    save_file(lora, str(comfy_dirs / "models" / "loras" / NAME))
    return patcher, base, lora


def _node():
    return NODE_CLASS_MAPPINGS["LoraLoadComplete"]


def _load(node, *args, **inputs) -> tuple:
    """The node's (MODEL, CLIP) outputs."""
    return tuple(call_node(node, *args, **inputs)["result"])


def _loaded(model) -> dict[str, torch.Tensor]:
    model.patch_model(torch.device("cpu"))
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_comfyui_loader_skips_the_nonleaf_parameter(setup) -> None:
    # The gap the node closes: ComfyUI accepts the patch but its load never applies it.
    patcher, base, lora = setup
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 0.5, 0)
    assert P + "pos_embed" in model.patches
    sd = _loaded(model)
    assert torch.equal(sd[P + "pos_embed"], base[P + "pos_embed"])
    assert not torch.equal(sd[P + "lin.weight"], base[P + "lin.weight"])


def test_applies_what_lora_loader_applies_plus_the_skipped_parameter(setup) -> None:
    patcher, base, lora = setup
    reference, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 0.5, 0)
    ref = _loaded(reference)
    reference.unpatch_model()
    model, clip = _load(_node(), patcher, NAME, 0.5)
    assert clip is None
    sd = _loaded(model)
    for k in base:
        if k != P + "pos_embed":
            assert torch.equal(sd[k], ref[k]), k   # bit for bit what LoraLoader gives
    torch.testing.assert_close(sd[P + "pos_embed"], base[P + "pos_embed"] + 0.5 * lora[P + "pos_embed.diff"],
                               rtol=0, atol=1e-6)
    # loading again (same patches) does not add the diff twice
    model.patch_model(torch.device("cpu"))
    torch.testing.assert_close(model.model.state_dict()[P + "pos_embed"], sd[P + "pos_embed"], rtol=0, atol=0)


def test_unload_and_strength_change_restore_the_skipped_parameter(setup) -> None:
    patcher, base, lora = setup
    node = _node()
    half, _ = _load(node, patcher, NAME, 0.5)
    _loaded(half)
    half.unpatch_model()
    after = patcher.model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k                       # exactly the base again
    minus, _ = _load(node, patcher, NAME, -1.0)
    sd = _loaded(minus)
    torch.testing.assert_close(sd[P + "pos_embed"], base[P + "pos_embed"] - lora[P + "pos_embed.diff"],
                               rtol=0, atol=1e-6)
    minus.unpatch_model()
    assert torch.equal(patcher.model.state_dict()[P + "pos_embed"], base[P + "pos_embed"])


def test_clip_gets_its_strength_and_zero_strengths_change_nothing(setup) -> None:
    patcher, _base, lora = setup
    enc = torch.nn.Module()
    enc.enc = torch.nn.Linear(3, 3, bias=False)
    clip = CLIP(ClipTarget(tokenizer=None, clip=lambda: enc))
    w0 = enc.enc.weight.detach().clone()
    model, new_clip = _load(_node(), patcher, NAME, 1.0, clip=clip, strength_clip=0.25)
    assert new_clip is not clip and model is not patcher
    new_clip.patcher.patch_model(torch.device("cpu"))
    torch.testing.assert_close(enc.enc.weight.detach(), w0 + 0.25 * lora["text_encoders.enc.diff"],
                               rtol=0, atol=1e-6)
    new_clip.patcher.unpatch_model()
    same_model, same_clip = _load(_node(), patcher, NAME, 0.0, clip=clip, strength_clip=0.0)
    assert same_model is patcher and same_clip is clip


def test_unknown_lora_name_is_a_clear_error(setup) -> None:
    patcher, _base, _lora = setup
    with pytest.raises(ExtractionInputError, match=r"lora_name 'nope.safetensors' is not in the loras folder"):
        _load(_node(), patcher, "nope.safetensors", 1.0)


# --- which parameters ComfyUI's load skips (the module that owns each patched key) -----------

def test_only_parameters_of_modules_with_sub_modules_are_reported() -> None:
    from lora_extract.nodes.comfy_adapter import nonleaf_patch_keys

    model = make_toy_patcher(seed=3).model
    keys = [(P + "lin.weight", 0),           # an offset patch key: not a plain key, ignored
            P + "gone.weight", P + "gone.bias",   # no such module (twice: the answer is cached)
            P + "lin.weight", P + "lin.bias", P + "blocks.0.weight", P + "norm.weight",  # leaves
            P + "pos_embed",                 # sits on diffusion_model, which has sub-modules
            P + "conv.weight"]
    assert nonleaf_patch_keys(model, keys) == [P + "pos_embed"]
    assert nonleaf_patch_keys(model, [P + "pos_embed", P + "lin.weight", P + "pos_embed"]) == [
        P + "pos_embed", P + "pos_embed"]


def _mark_comfy_ops(module: torch.nn.Module) -> None:
    """Leaf modules marked like ComfyUI's ``comfy.ops`` layers: what allows a partial load."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)) and not any(True for _ in m.children()):
            m.comfy_cast_weights = False


def test_partly_loaded_model_gets_the_skipped_parameter_too(setup) -> None:
    # A lowvram load: the largest leaf modules are patched, the others keep a LowVramPatch;
    # the parameter on diffusion_model (not a leaf) is patched by the node's load callback.
    import comfy.model_management as mm

    patcher, base, lora = setup
    _mark_comfy_ops(patcher.model)
    model, _ = _load(_node(), patcher, NAME, 0.5)
    sizes = sorted((mm.module_size(m) for m in model.model.modules() if hasattr(m, "comfy_cast_weights")),
                   reverse=True)
    model.partially_load(torch.device("cpu"), extra_memory=sizes[0] + 1)
    assert model.model.model_lowvram
    lin = model.model.diffusion_model.lin
    assert lin.weight_function and torch.equal(lin.weight.detach(), base[P + "lin.weight"])  # applied when run
    torch.testing.assert_close(model.model.state_dict()[P + "pos_embed"],
                               base[P + "pos_embed"] + 0.5 * lora[P + "pos_embed.diff"], rtol=0, atol=1e-6)
    model.unpatch_model()
    assert torch.equal(patcher.model.state_dict()[P + "pos_embed"], base[P + "pos_embed"])


def test_a_skipped_parameter_already_patched_is_not_patched_again_but_the_others_are(setup) -> None:
    from comfy.model_patcher import ModelPatcher

    from lora_extract.nodes.comfy_adapter import load_lora_complete

    patcher, _base, _lora = setup
    patcher.model.diffusion_model.modulation = torch.nn.Parameter(torch.zeros(2, 6))  # a 2nd non-leaf
    patcher = ModelPatcher(patcher.model, torch.device("cpu"), torch.device("cpu"))
    diffs = {P + "pos_embed.diff": torch.ones(1, 4, 6), P + "modulation.diff": torch.ones(2, 6)}
    model, _clip, extra = load_lora_complete(patcher, None, diffs, 1.0, 0.0)
    assert extra == [P + "pos_embed", P + "modulation"]
    before = model.model.diffusion_model.pos_embed.detach().clone()
    model.patch_weight_to_device(P + "pos_embed")        # patched already (e.g. by an earlier load)
    model.patch_model(torch.device("cpu"))
    torch.testing.assert_close(model.model.diffusion_model.pos_embed.detach(), before + 1, rtol=0, atol=0)
    torch.testing.assert_close(model.model.diffusion_model.modulation.detach(), torch.ones(2, 6), rtol=0, atol=0)


def test_skipped_keys_are_reported_with_a_clip_connected(setup) -> None:
    from lora_extract.nodes.comfy_adapter import load_lora_complete

    patcher, _base, lora = setup
    enc = torch.nn.Module()
    enc.enc = torch.nn.Linear(3, 3, bias=False)
    clip = CLIP(ClipTarget(tokenizer=None, clip=lambda: enc))
    _model, new_clip, extra = load_lora_complete(patcher, clip, lora, 1.0, 1.0)
    assert new_clip is not None and new_clip is not clip
    assert extra == [P + "pos_embed"]      # the model's; the CLIP has none


def test_a_file_is_read_once_until_it_changes(setup, comfy_dirs, monkeypatch) -> None:
    """As LoraLoader keeps its last file: a strength change does not read the LoRA again, a
    rewritten file is read again (V3 nodes keep no instance, so the pack keeps the last one)."""
    import lora_extract.nodes.comfy_adapter as adapter

    patcher, _base, lora = setup
    reads = []
    real = adapter.load_lora_file
    monkeypatch.setattr(adapter, "load_lora_file", lambda path: reads.append(path) or real(path))
    _load(_node(), patcher, NAME, 0.5)
    _load(_node(), patcher, NAME, 0.7)
    assert len(reads) == 1
    path = comfy_dirs / "models" / "loras" / NAME
    save_file({k: v * 2 for k, v in lora.items()}, str(path))
    os.utime(path, (1, 1))     # a different mtime even within the filesystem's time resolution
    _load(_node(), patcher, NAME, 0.5)
    assert len(reads) == 2
