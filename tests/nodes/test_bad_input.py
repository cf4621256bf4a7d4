"""Bad input to the LoraExtract node: unsafe names, out-of-range options, mismatched models.

Every refused run must leave every file on disk as it was, including a sentinel file placed
just outside the output folder, which an escaping name would reach.
"""

from __future__ import annotations

import hashlib
import os

import comfy.model_management as mm
import folder_paths
import pytest
import torch
from comfy.model_patcher import ModelPatcher

from lora_extract.extract import ExtractionInputError, NothingToExtract
from tests.nodes.test_extract_node import _run
from tests.support.helpers import module_from_state_dict, patched_pair


@pytest.fixture(scope="module")
def patchers():
    return patched_pair(width=16, seed=9)[2:]


@pytest.fixture
def sandbox(tmp_path):
    """ComfyUI folders under ``tmp/comfy``; sentinels next to and above the output folder."""
    comfy_root = tmp_path / "comfy"
    folder_paths._set_base_dir(str(comfy_root))
    mm.interrupt_current_processing(False)
    for p in (tmp_path / "sentinel", comfy_root / "sentinel", comfy_root / "models" / "sentinel"):
        p.write_bytes(b"must not change")
    for folder in (comfy_root / "output", comfy_root / "models" / "loras"):
        os.symlink(str(tmp_path), str(folder / "link_out"))  # a link that leads outside
    return tmp_path


def _snapshot(root) -> dict[str, str]:
    out = {}
    for d, _, fs in os.walk(str(root)):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, str(root))] = hashlib.sha256(fh.read()).hexdigest()
    return out


UNSAFE_PREFIXES = [
    "../sentinel", "../../sentinel", "loras/../../sentinel", "..", ".", "",
    "..\\sentinel", "loras\\..\\..\\sentinel", "C:\\sentinel", "C:/sentinel", "/tmp/sentinel",
    "//server/share/sentinel", "a\x00b", "loras/\x00../../sentinel", "loras/", "link_out/sentinel",
]


@pytest.mark.parametrize("save_to", ["output", "models/loras"])
@pytest.mark.parametrize("prefix", UNSAFE_PREFIXES, ids=[repr(p) for p in UNSAFE_PREFIXES])
def test_unsafe_prefix_writes_nothing_anywhere(sandbox, patchers, prefix: str, save_to: str) -> None:
    patcher, tuned_patcher = patchers
    if prefix.startswith("/"):
        prefix = str(sandbox / "sentinel")  # an absolute path at the sentinel itself
    before = _snapshot(sandbox)
    with pytest.raises(ExtractionInputError) as info:
        _run(dict(finetuned_model=tuned_patcher, original_model=patcher, filename_prefix=prefix,
                  save_to=save_to))
    msg = str(info.value)
    assert "filename_prefix" in msg and ("output folder" in msg or "NUL" in msg or "file name" in msg)
    assert _snapshot(sandbox) == before


def test_safe_subfolders_stay_inside(sandbox, patchers) -> None:
    patcher, tuned_patcher = patchers
    path = _run(dict(finetuned_model=tuned_patcher, original_model=patcher,
                     filename_prefix="loras/a/./b/../c/my_lora"))["result"][0]
    out = str(sandbox / "comfy" / "output")
    assert os.path.commonpath([out, path]) == out
    assert path == os.path.join(out, "loras", "a", "c", "my_lora_rank_8_fp16_00001_.safetensors")


def test_counter_skips_existing_files_and_never_overwrites(sandbox, patchers) -> None:
    patcher, tuned_patcher = patchers
    folder = sandbox / "comfy" / "output" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    taken = {n: b"user file %d" % i for i, n in enumerate([
        "ComfyUI_extracted_lora_rank_8_fp16_00001_.safetensors",
        "ComfyUI_extracted_lora_rank_8_fp16_00005_.safetensors",
        "ComfyUI_extracted_lora_rank_16_fp32_00007_.safetensors",
        "ComfyUI_extracted_lora_rank_8_fp16_00008_.safetensors.part",   # not a counter name
    ])}
    for n, data in taken.items():
        (folder / n).write_bytes(data)
    path = _run(dict(finetuned_model=tuned_patcher, original_model=patcher))["result"][0]
    assert os.path.basename(path) == "ComfyUI_extracted_lora_rank_8_fp16_00008_.safetensors"
    for n, data in taken.items():
        assert (folder / n).read_bytes() == data


@pytest.mark.parametrize("option,value,words", [
    ("rank", 0, "rank 0 is out of range"),
    ("rank", 4097, "rank 4097 is out of range"),
    ("conv_rank", 5000, "conv_rank 5000 is out of range"),
    ("conv_rank", -1, "conv_rank -1 is out of range"),
    ("adaptive_param", -0.01, "adaptive_param -0.01 is out of range"),
    ("adaptive_param", 1.01, "adaptive_param 1.01 is out of range"),
    ("adaptive_param", float("nan"), "adaptive_param nan is out of range"),
    ("lowrank_iters", 0, "lowrank_iters 0 is out of range"),
    ("alpha", -2.0, "alpha -2.0 must be >= 0"),
    ("lora_type", "loha", "lora_type 'loha' is not one of"),
    ("output_dtype", "fp8", "output_dtype 'fp8' is not one of"),
])
def test_out_of_range_options_are_refused_before_any_work(sandbox, patchers, monkeypatch, option: str,
                                                          value: object, words: str) -> None:
    import lora_extract.extract.layer_work as layer_work

    patcher, tuned_patcher = patchers
    monkeypatch.setattr(layer_work, "process_pair", lambda *a, **k: pytest.fail("a layer was processed"))
    before = _snapshot(sandbox)
    with pytest.raises(ExtractionInputError, match=words.replace("(", r"\(")):
        _run({"finetuned_model": tuned_patcher, "original_model": patcher, option: value})
    assert _snapshot(sandbox) == before


def test_identical_models_report_and_write_nothing(sandbox, patchers) -> None:
    patcher, _ = patchers
    before = _snapshot(sandbox)
    with pytest.raises(NothingToExtract, match="the two models are identical") as info:
        _run(dict(finetuned_model=patcher.clone(), original_model=patcher))
    assert {r.reason for r in info.value.report.layers} == {"no difference"}
    assert _snapshot(sandbox) == before


def test_different_architectures_and_shapes_are_refused(sandbox, patchers) -> None:
    patcher, _ = patchers
    other = ModelPatcher(module_from_state_dict({"diffusion_model.double_blocks.0.qkv.weight": torch.ones(8, 8)}),
                         torch.device("cpu"), torch.device("cpu"))
    before = _snapshot(sandbox)
    with pytest.raises(ExtractionInputError, match="share no weight keys"):
        _run(dict(finetuned_model=other, original_model=patcher))
    key = "diffusion_model.blocks.0.self_attn.qkv.weight"
    sd = {k: v.clone() for k, v in patcher.model_state_dict().items()}
    sd[key] = torch.ones(sd[key].shape[0] + 1, sd[key].shape[1])
    resized = ModelPatcher(module_from_state_dict(sd), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ExtractionInputError, match=r"qkv\.weight' has shape \[49, 16\]"):
        _run(dict(finetuned_model=resized, original_model=patcher))
    assert _snapshot(sandbox) == before
