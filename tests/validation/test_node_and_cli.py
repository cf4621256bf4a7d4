"""LoraValidate node (through the ComfyUI stub), LoraExtract's chart output, and the CLI."""

from __future__ import annotations

import json
import os

import comfy.model_management
import comfy.utils
import folder_paths
import pytest
import torch
from comfy.model_patcher import ModelPatcher
from safetensors.torch import save_file

from lora_extract.charts import HEIGHT, WIDTH
from lora_extract.cli import main
from lora_extract.extract import ExtractionInputError
from lora_extract.extract.synthetic import LayerSpec, make_pair, write_pair
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from lora_extract.nodes.validate_node import FROM_PATH
from tests.support.helpers import call_node, module_from_state_dict

LAYERS = [
    LayerSpec("diffusion_model.input_blocks.1.1.proj_in.weight", (32, 32), 4),
    LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.weight", (32, 16, 3, 3), 4),
    LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.bias", (32,), 1),
    LayerSpec("diffusion_model.middle_block.1.proj_out.weight", (32, 32), 4),
    LayerSpec("diffusion_model.output_blocks.0.0.skip.weight", (32, 32), 0),
]


@pytest.fixture
def setup(tmp_path):
    folder_paths._set_base_dir(str(tmp_path))
    comfy.model_management.interrupt_current_processing(False)
    comfy.utils._reset()
    base, tuned = make_pair(LAYERS, seed=3, noise=0.0)
    patcher = ModelPatcher(module_from_state_dict(base), torch.device("cpu"), torch.device("cpu"))
    tuned_patcher = patcher.clone()
    tuned_patcher.add_patches({k: (tuned[k] - base[k],) for k in base})
    return tmp_path, base, tuned, patcher, tuned_patcher


def _extract(tuned_patcher, patcher, **kw) -> dict:
    args = dict(finetuned_model=tuned_patcher, original_model=patcher,
                filename_prefix="loras/test_lora", rank=4, lora_type="standard",
                algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp32", bias_diff=True,
                adaptive_param=0.15, clamp_quantile=False)
    args.update(kw)
    return call_node(NODE_CLASS_MAPPINGS["LoraExtract"], **args)


def _check_chart(image: torch.Tensor, ui_images: list[dict]) -> None:
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.01
    (entry,) = ui_images
    assert entry["type"] == "temp" and entry["filename"].endswith("_.png")
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"]))


def test_extract_then_validate_chained(setup) -> None:
    _tmp, _base, _tuned, patcher, tuned_patcher = setup
    out = _extract(tuned_patcher, patcher)
    path, _text, chart = out["result"]
    _check_chart(chart, out["ui"]["images"])
    res = call_node(NODE_CLASS_MAPPINGS["LoraValidate"], tuned_patcher, patcher, FROM_PATH, path)
    text, vchart = res["result"]
    _check_chart(vchart, res["ui"]["images"])
    # Rank-4 deltas extracted at rank 4 in fp32: reproduced; the untouched layer is not needed.
    assert "coverage: 4/4 changed weights patched (100.0%), 0 uncovered" in text
    assert "quality: excellent 4, good 0, poor 0" in text
    # The box on the node: key lines first (file, size, ranks, errors, counts), then the report.
    key, _, rest = res["ui"]["text"][0].partition("\n\n")
    assert rest == text
    assert key.splitlines() == [
        f"file: {os.path.basename(path)}",
        f"size: {os.path.getsize(path) / 2**20:.2f} MiB, coverage 4/4 changed weights",
        "ranks: 4",
        key.splitlines()[3],
        "skipped: 0, flagged: 0"]
    assert key.splitlines()[3].startswith("error: mean 0.0%, median 0.0%, worst 0.0%")
    values = [v for _n, v, _t in comfy.utils._progress_log]
    assert values[-len(LAYERS):] == list(range(1, len(LAYERS) + 1))


def test_validate_a_file_from_the_loras_folder_with_a_dropped_layer(setup) -> None:
    _tmp, base, tuned, patcher, tuned_patcher = setup
    out = _extract(tuned_patcher, patcher, save_to="models/loras")
    path = out["result"][0]
    name = os.path.basename(path)
    assert name in NODE_CLASS_MAPPINGS["LoraValidate"].INPUT_TYPES()["required"]["lora_name"][1]["options"]
    from safetensors.torch import load_file

    lora = load_file(path)
    dropped = {k: v for k, v in lora.items() if "middle_block" not in k}
    save_file(dropped, os.path.join(os.path.dirname(path), "dropped.safetensors"))
    text = call_node(NODE_CLASS_MAPPINGS["LoraValidate"], tuned_patcher, patcher, "dropped.safetensors")["result"][0]
    assert "coverage: 3/4 changed weights patched (75.0%), 1 uncovered" in text
    assert "100.00%  uncovered" in text and "middle_block.1.proj_out.weight" in text


def test_validate_refuses_paths_outside_comfy_folders(setup, tmp_path_factory) -> None:
    _tmp, _base, _tuned, patcher, tuned_patcher = setup
    outside = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(outside))
    node = NODE_CLASS_MAPPINGS["LoraValidate"]
    with pytest.raises(ExtractionInputError, match="outside ComfyUI's output"):
        call_node(node, tuned_patcher, patcher, FROM_PATH, str(outside))
    with pytest.raises(ExtractionInputError, match="no LoRA given"):
        call_node(node, tuned_patcher, patcher, FROM_PATH, "")


def test_cli_validate_report_chart_and_exit_codes(tmp_path, capsys) -> None:
    bp, tp = write_pair(str(tmp_path), LAYERS, seed=4)
    lora = str(tmp_path / "l.safetensors")
    assert main(["extract", bp, tp, "-o", lora, "--rank", "4", "--dtype", "fp32", "--no-clamp"]) == 0
    report, chart = str(tmp_path / "r.json"), str(tmp_path / "c.png")
    assert main(["validate", bp, tp, lora, "--report", report, "--chart", chart]) == 0
    data = json.loads(open(report, encoding="utf-8").read())
    assert data["summary"]["coverage"] == 1.0 and data["summary"]["unmatched_keys"] == 0
    # The generated pair has a noise tail: rank 4 leaves a small but non-zero error.
    assert 0.0 < data["summary"]["overall_error"] < 0.2
    from PIL import Image

    assert Image.open(chart).size == (WIDTH, HEIGHT)
    assert "coverage: 4/4" in capsys.readouterr().out
    assert main(["validate", bp, tp, lora, "--max-error", "1e-6"]) == 1
    assert main(["validate", bp, tp, str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_validate_node_honours_interrupt_between_layers(setup, monkeypatch) -> None:
    _tmp, _base, _tuned, patcher, tuned_patcher = setup
    path = _extract(tuned_patcher, patcher)["result"][0]
    import lora_extract.validation.validate as validate

    real, seen = validate.validate_layer, []

    def interrupting(pair, *a, **k):
        seen.append(pair.path)
        if len(seen) == 2:
            comfy.model_management.interrupt_current_processing(True)
        return real(pair, *a, **k)

    monkeypatch.setattr(validate, "validate_layer", interrupting)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        call_node(NODE_CLASS_MAPPINGS["LoraValidate"], tuned_patcher, patcher, FROM_PATH, path)
    assert len(seen) == 2  # stopped at the next layer boundary


def test_loader_option_scores_the_parameter_comfyui_skips(tmp_path, capsys) -> None:
    # A parameter on the model root (which has sub-modules): stored as .diff, never applied by
    # ComfyUI's LoraLoader, applied by "Load LoRA (complete)".
    layers = [*LAYERS, LayerSpec("diffusion_model.scale_shift_table", (32,), 1)]
    bp, tp = write_pair(str(tmp_path), layers, seed=5)
    lora = str(tmp_path / "l.safetensors")
    assert main(["extract", bp, tp, "-o", lora, "--rank", "4", "--dtype", "fp32", "--no-clamp"]) == 0
    capsys.readouterr()
    reports = {}
    for loader in ("complete", "comfyui"):
        out = str(tmp_path / f"{loader}.json")
        assert main(["validate", bp, tp, lora, "--loader", loader, "--report", out]) == 0
        reports[loader] = json.loads(open(out, encoding="utf-8").read())
    assert reports["complete"]["summary"]["covered"] == 5 and reports["complete"]["summary"]["not_merged"] == 0
    assert reports["comfyui"]["summary"]["covered"] == 4 and reports["comfyui"]["summary"]["not_merged"] == 1
    row = next(r for r in reports["comfyui"]["layers"] if r["path"] == "scale_shift_table")
    assert row["status"] == "not_merged" and "Load LoRA (complete)" in row["note"]
    assert main(["validate", bp, tp, lora, "--loader", "comfyui", "--max-error", "0.9"]) == 1
    assert main(["validate", bp, tp, lora, "--loader", "complete", "--max-error", "0.9"]) == 0
    with pytest.raises(SystemExit) as e:   # argparse: unknown choice, usage error
        main(["validate", bp, tp, lora, "--loader", "diffusers"])
    assert e.value.code == 2


def test_validate_node_loader_input(setup) -> None:
    _tmp, _base, _tuned, patcher, tuned_patcher = setup
    path = _extract(tuned_patcher, patcher)["result"][0]
    node = NODE_CLASS_MAPPINGS["LoraValidate"]
    assert node.INPUT_TYPES()["optional"]["loader"][1]["options"] == ["comfyui", "complete"]
    assert node.INPUT_TYPES()["optional"]["loader"][1]["default"] == "complete"
    for loader in ("comfyui", "complete"):   # no parameter of a module with sub-modules here
        text = call_node(node, tuned_patcher, patcher, FROM_PATH, path, loader=loader)["result"][0]
        assert "coverage: 4/4" in text
