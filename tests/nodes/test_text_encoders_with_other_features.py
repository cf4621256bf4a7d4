"""Text encoders together with the features built beside them: the diffusers key style, the
file-size budget, the dry run and the V2 command line."""

from __future__ import annotations

import json

import comfy.lora
import pytest
import torch
from safetensors.torch import load_file

from lora_extract.cli import main
from lora_extract.extract import ExtractConfig, ExtractionInputError
from lora_extract.extract.keys.te_keys import TE_UNMAPPED_NOTE, encoders_in, lora_keys_for, te_unmapped
from lora_extract.extract.pairing import plan_pair
from lora_extract.extract.pipeline import extract_lora
from lora_extract.nodes.model_inputs import node_sources
from tests.extract.keys.test_text_encoder_checkpoints import _write_checkpoints
from tests.nodes.test_text_encoders import _extract
from tests.support.te_helpers import SD1ClipModel, SD3ClipModel, SDXLClipModel, make_clip, tuned_clip

MIB = 2**20


@pytest.mark.parametrize("cls", [SD1ClipModel, SDXLClipModel, SD3ClipModel])
def test_diffusers_style_text_encoder_keys_map_or_are_flagged(cls) -> None:
    """Every patchable text-encoder parameter either gets a PEFT key that ComfyUI's
    model_lora_keys_clip maps to the same weight, or is flagged by te_unmapped: none is both,
    none is neither."""
    clip = make_clip(cls)
    sd = clip.cond_stage_model.state_dict()
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    paths = ["text_encoders." + k for k in sd]
    encoders = encoders_in(paths)
    weights = {p for p in paths if p.endswith(".weight")}
    flagged = te_unmapped(paths, weights, encoders)
    mapped_count = 0
    for k in sd:
        module, _, leaf = k.rpartition(".")
        path = "text_encoders." + k
        got = lora_keys_for(path, "diffusers", module + ".weight" in sd, encoders)
        if leaf not in ("weight", "bias"):
            assert got is None and path not in flagged, k
            continue
        keys, role = got
        if path in flagged:
            assert flagged[path] == TE_UNMAPPED_NOTE
            assert not keys.prefix.startswith(("text_encoder.", "text_encoder_2.")), k
            continue
        assert keys.prefix.startswith(("text_encoder.", "text_encoder_2.")), k
        assert key_map[keys.prefix] == module + ".weight", (k, keys.prefix)
        assert keys.up.endswith(".lora_B.weight") and keys.down.endswith(".lora_A.weight")
        mapped_count += 1
    assert mapped_count >= 12


def test_sdxl_clip_g_goes_to_text_encoder_2_next_to_clip_l() -> None:
    q = "text_encoders.clip_{}.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    both = ("clip_g", "clip_l")
    assert lora_keys_for(q.format("l"), "diffusers", True, both)[0].prefix == \
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"
    assert lora_keys_for(q.format("g"), "diffusers", True, both)[0].prefix == \
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"
    assert lora_keys_for(q.format("g"), "diffusers", True, ("clip_g",))[0].prefix == \
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"


def test_clip_pair_alone_resolves_auto_to_comfy_and_refuses_diffusers(comfy_dirs) -> None:
    base = make_clip(SD1ClipModel, seed=3)
    tuned, _ = tuned_clip(base, rank=3, seed=4)
    path = _extract(finetuned_clip=tuned, original_clip=base, key_style="auto")["result"][0]
    keys = list(load_file(path))
    assert keys and all(k.startswith("text_encoders.") for k in keys)
    with pytest.raises(ExtractionInputError, match="key_style 'diffusers' needs a diffusion model "
                                                   "in diffusers naming; this input has only text"):
        _extract(finetuned_clip=tuned, original_clip=base, key_style="diffusers")


def test_text_encoder_labels_do_not_change_the_naming_detected(comfy_dirs) -> None:
    """A ComfyUI-named model with a CLIP: auto is comfy, and the text encoders' names never make
    the input look diffusers-named (no diffusers note, no flagged layer)."""
    from tests.support.helpers import patched_pair

    _b, _t, patcher, tuned_patcher = patched_pair(width=32, seed=2)
    base = make_clip(SDXLClipModel, seed=5)
    tuned, _ = tuned_clip(base, rank=3, seed=6)
    b, t = node_sources(tuned_patcher, patcher, tuned, base)
    res = extract_lora(b, t, ExtractConfig(rank=4, key_style="auto"))
    assert not any("diffusers" in n for n in res.report.notes)
    assert not any(r.reason.startswith("not stored: ComfyUI") for r in res.report.layers)
    assert any(k.startswith("text_encoders.clip_g.") for k in res.tensors)


def test_size_budget_covers_the_text_encoders_with_their_own_cap(comfy_dirs) -> None:
    """target_size_mb with a MODEL and a CLIP pair: the file fits, every text-encoder layer is
    allocated a rank no higher than text_encoder_rank, and both parts get layers."""
    from tests.support.helpers import patched_pair

    _b, _t, patcher, tuned_patcher = patched_pair(width=64, seed=2)
    base = make_clip(SD1ClipModel, seed=3)
    tuned, _ = tuned_clip(base, rank=6, seed=4)
    b, t = node_sources(tuned_patcher, patcher, tuned, base)
    plan = plan_pair(b, t)
    assert plan.encoders == ("clip_l",)
    full = extract_lora(b, t, ExtractConfig(rank=16, text_encoder_rank=2, output_dtype="fp32",
                                            clamp_quantile=None))
    full_bytes = sum(v.numel() * v.element_size() for v in full.tensors.values())
    te_ranks_full = {r.rank for r in full.report.layers
                     if r.key.startswith("text_encoders.") and r.status == "lora"}
    assert te_ranks_full == {2}
    target = 0.6 * full_bytes / MIB
    res = extract_lora(b, t, ExtractConfig(rank=16, text_encoder_rank=2, output_dtype="fp32",
                                           clamp_quantile=None, target_size_mb=target))
    used = sum(v.numel() * v.element_size() for v in res.tensors.values())
    assert used <= target * MIB
    te = [r for r in res.report.layers if r.key.startswith("text_encoders.") and r.status == "lora"]
    dm = [r for r in res.report.layers if not r.key.startswith("text_encoders.") and r.status == "lora"]
    assert te and dm
    assert max(r.rank for r in te) <= 2
    assert max(r.rank for r in dm) > 2          # the model's cap is rank, not text_encoder_rank


def test_dry_run_counts_checkpoint_text_encoders_unless_told_not_to(tmp_path, capsys) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sd1")

    def layers(*extra: str) -> int:
        assert main(["extract", base, tuned, "--dry-run", "--rank", "4", *extra]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        return int(first.split("dry run: ")[1].split(" LoRA layers")[0])

    with_te = layers()
    without = layers("--no-text-encoder")
    assert without == 2 and with_te >= without + 10   # the tiny CLIP-L: 14 matrices
    assert main(["extract", base, tuned, "--dry-run", "--rank", "4", "--text-encoder-rank", "2"]) == 0
    assert "text encoders 2" in capsys.readouterr().out


def test_v2_command_line_extracts_checkpoint_text_encoders(tmp_path, capsys) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sdxl")
    v1, v2, rep = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors", tmp_path / "r.json"
    common = ["--rank", "3", "--dtype", "fp32", "--no-clamp", "--key-style", "kohya",
              "--device", "cpu"]
    assert main(["extract", base, tuned, "-o", str(v1), *common]) == 0
    assert main(["extract", base, tuned, "-o", str(v2), *common, "--v2", "--report", str(rep)]) == 0
    a, b = load_file(str(v1)), load_file(str(v2))
    assert sorted(a) == sorted(b)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in b
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    parts = json.loads(rep.read_text())["summary"]["parts"]
    assert parts["text_encoders"]["lora"] > 0
