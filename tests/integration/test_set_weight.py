"""Fine-tune-only tensors (``set_weight``) applied by the real ComfyUI.

Runs when ``COMFYUI_ROOT`` (a ComfyUI checkout) and ``COMFY_VENV`` (its virtual environment) are
set; skipped otherwise. A tiny Wan 2.1 pair is made with ComfyUI's own model classes
(``scripts/comfyui/make_tiny_models.py``); the base file then loses two tensors (a weight and a
bias), which the fine-tuned model keeps. ComfyUI loads the base file (building the two parameters
from the architecture), maps and loads our LoRA with its own key map and loader, and patches the
model (``integration/comfy_patch_model.py``). Checks:

1. 0 keys not loaded (comfy and kohya key styles), and the two set patches give exactly the fine-tuned tensors, at strength 1
   and at strength 0.5 (a set patch ignores the strength);
2. every other changed weight is the fine-tuned one to within the error our report states
   (parameters the report flags as on non-leaf modules excepted: ComfyUI never patches those);
3. a layer the fine-tune added (no such parameter in ComfyUI's model) is stored too, and ComfyUI
   logs exactly that key as not loaded, as docs/layer-selection.md says.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_to_file
from lora_extract.extract.pair_output import NONLEAF_NOTE
from tests.support.paths import REPO_ROOT

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(not (ROOT and VENV), reason="COMFYUI_ROOT / COMFY_VENV not set (no real ComfyUI)")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_patch_model.py")
MAKER = os.path.join(REPO_ROOT, "scripts", "comfyui", "make_tiny_models.py")
DROPPED = ("blocks.1.cross_attn.o.weight", "blocks.1.ffn.0.bias")
ADDED = "blocks.0.extra_proj.weight"


def _python() -> str:
    return os.path.join(VENV, "bin", "python")


@pytest.fixture(scope="module")
def wan_pair(tmp_path_factory) -> tuple[str, str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("wan")
    res = subprocess.run([_python(), MAKER, "--arch", "wan21", "--out", str(folder), "--dtype",
                          "fp32", "--prefix", "t_"], cwd=ROOT,
                         env={**os.environ, "COMFYUI_ROOT": ROOT}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    base = load_file(str(folder / "t_wan21_base.safetensors"))
    tuned = load_file(str(folder / "t_wan21_tuned.safetensors"))
    for k in DROPPED:
        del base[k]
    base_path = str(folder / "base_lacking.safetensors")
    save_file(base, base_path)
    return base_path, str(folder / "t_wan21_tuned.safetensors"), base, tuned


def _comfy(tmp_path, model: str, lora: str, strength: float, tag: str):
    job = {"model": model, "lora": lora, "strength": strength,
           "out": str(tmp_path / f"{tag}_patched.safetensors")}
    job_path = tmp_path / f"{tag}_job.json"
    job_path.write_text(json.dumps(job))
    res = subprocess.run([_python(), SCRIPT, str(job_path)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return load_file(job["out"]), out["not_loaded"]


@pytest.mark.parametrize("strength,key_style", [(1.0, "comfy"), (0.5, "comfy"), (1.0, "kohya")])
def test_set_weight_restores_tensors_the_base_file_lacks(wan_pair, tmp_path, strength: float,
                                                         key_style: str) -> None:
    base_path, tuned_path, base, tuned = wan_pair
    lora = str(tmp_path / "lora.safetensors")
    report = extract_to_file(SafetensorsSource(base_path), SafetensorsSource(tuned_path),
                             ExtractConfig(rank=16, output_dtype="fp32", clamp_quantile=None,
                                           key_style=key_style), lora)
    stored = load_file(lora)
    assert {f"diffusion_model.{k.removesuffix('.weight')}.set_weight" for k in DROPPED} <= set(stored)
    patched, not_loaded = _comfy(tmp_path, base_path, lora, strength, f"s{strength}{key_style}")
    assert not_loaded == []
    for k in DROPPED:
        assert torch.equal(patched[k], tuned[k]), k
    if strength != 1.0:
        return
    # Parameters of non-leaf modules (Wan's modulation) are flagged: ComfyUI never patches them.
    errors = {r.key: r.rel_error for r in report.layers
              if r.rel_error is not None and r.reason != NONLEAF_NOTE}
    checked = 0
    for k, w in base.items():
        d = (tuned[k].double() - w.double()).norm()
        if d == 0 or k not in errors:
            continue
        rel = float((patched[k].double() - tuned[k].double()).norm() / d)
        assert rel <= errors[k] + 1e-3, (k, rel, errors[k])
        checked += 1
    assert checked > 50


def test_a_layer_comfyui_does_not_have_is_reported_by_comfyui(wan_pair, tmp_path) -> None:
    base_path, tuned_path, _base, tuned = wan_pair
    with_new = dict(tuned)
    with_new[ADDED] = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    tuned_new = str(tmp_path / "tuned_new.safetensors")
    save_file(with_new, tuned_new)
    lora = str(tmp_path / "lora_new.safetensors")
    report = extract_to_file(SafetensorsSource(base_path), SafetensorsSource(tuned_new),
                             ExtractConfig(rank=4, output_dtype="fp32"), lora)
    entry = next(r for r in report.layers if r.key == ADDED)
    assert entry.reason.startswith("only in the fine-tuned model: stored as")
    _patched, not_loaded = _comfy(tmp_path, base_path, lora, 1.0, "new")
    assert not_loaded == ["diffusion_model.blocks.0.extra_proj.set_weight"]
