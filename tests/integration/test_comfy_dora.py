"""DoRA output of extraction, loaded by the real ComfyUI's loader code.

Runs when ``COMFYUI_ROOT`` (a ComfyUI checkout) and ``COMFY_VENV`` (its virtual environment) are
set; skipped otherwise. ComfyUI's own ``comfy.lora.load_lora`` + ``calculate_weight`` patch the
base weights with our file in a subprocess (``integration/comfy_apply_lora.py``). Checks:

1. ComfyUI's loader uses every key of the file (0 "lora key not loaded"), ``dora_scale``
   included, in the comfy, kohya and diffusers key styles and on both magnitude axes;
2. each weight ComfyUI patches at strength 1 is the fine-tuned one to exactly the error our
   report states for that layer (and the patched biases are the fine-tuned biases);
3. at another strength ComfyUI gives ``W + s (W' - W)``, ``W'`` the strength-1 weight.

The key map given to the loader is ComfyUI's generic one (``diffusion_model.<module>`` and
``lora_unet_<module>`` for every ``.weight``, the full key for other parameters); for the
diffusers style each ``transformer.<module>`` prefix is mapped onto the diffusers-named weight
(ComfyUI's Flux key map is exercised by the server test, ``integration/test_comfyui_server.py``).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.extract import ExtractConfig, StateDictSource, extract_to_file
from lora_extract.extract.synthetic import make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_to_file_streamed
from tests.extract.test_dora_output import _layers
from tests.support.diffusers_flux_model import flux_pair, flux_shapes

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(not (ROOT and VENV), reason="COMFYUI_ROOT / COMFY_VENV not set (no real ComfyUI)")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_apply_lora.py")
DM = "diffusion_model."


def _generic_key_map(model_keys: list[str]) -> dict[str, str]:
    """ComfyUI's generic LoRA key map (``model_lora_keys_unet``) for a diffusion model."""
    out: dict[str, str] = {}
    for k in model_keys:
        if k.endswith(".weight"):
            module = k[len(DM):-len(".weight")]
            out["lora_unet_" + module.replace(".", "_")] = k
            out[DM + module] = k
        else:
            out[k] = k
    return out


def _comfy(tmp_path, base: dict[str, torch.Tensor], lora_path: str, to_load: dict[str, str],
           strength: float, tag: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    base_path = str(tmp_path / f"{tag}_base.safetensors")
    save_file({k: v.contiguous() for k, v in base.items()}, base_path)
    job = {"base": base_path, "loras": [[lora_path, strength]], "to_load": to_load,
           "out": str(tmp_path / f"{tag}_patched.safetensors")}
    job_path = tmp_path / f"{tag}_job.json"
    job_path.write_text(json.dumps(job))
    res = subprocess.run([os.path.join(VENV, "bin", "python"), SCRIPT, str(job_path)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERROR" not in res.stderr, res.stderr[-3000:]   # ComfyUI logs a failed patch and skips it
    return load_file(job["out"]), json.loads(res.stdout.strip().splitlines()[-1])["not_loaded"]


def _extract(tmp_path, base, tuned, cfg: ExtractConfig, v2: bool):
    path = str(tmp_path / "dora.safetensors")
    b, t = StateDictSource(base, "base"), StateDictSource(tuned, "tuned")
    if v2:
        report, _ = extract_to_file_streamed(b, t, cfg, MemoryOptions(), path, cache=ResidentCache())
    else:
        report = extract_to_file(b, t, cfg, path)
    return path, report


def _check(report, base, tuned, patched, model_key) -> int:
    """Every DoRA layer and stored bias patched to the error its report line states."""
    checked = 0
    for r in report.layers:
        key = model_key(r.key)
        w, t, p = base[r.key].double(), tuned[r.key].double(), patched[key].double()
        if r.status == "skipped":
            continue
        err = float((p - t).norm() / (t - w).norm())
        assert err == pytest.approx(r.rel_error, rel=1e-4, abs=1e-6), r.key
        if r.status == "lora":
            assert r.dora_axis is not None
            checked += 1
    return checked


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("style,v2", [("comfy", False), ("kohya", False), ("kohya", True)])
def test_comfyui_patches_our_dora_file_to_the_reported_error(tmp_path, axis, style, v2) -> None:
    base, tuned = make_pair(_layers(), seed=11)
    cfg = ExtractConfig(rank=4, dora=axis, key_style=style, output_dtype="fp16")
    path, report = _extract(tmp_path, base, tuned, cfg, v2)
    stored = load_file(path)
    assert sum(k.endswith(".dora_scale") for k in stored) == 4
    to_load = _generic_key_map(list(base))
    patched, not_loaded = _comfy(tmp_path, base, path, to_load, 1.0, "s1")
    assert not_loaded == []
    assert _check(report, base, tuned, patched, lambda k: k) == 4
    # Another strength: ComfyUI blends W + s (W' - W) with the strength-1 weight W'.
    half, not_loaded = _comfy(tmp_path, base, path, to_load, 0.6, "s06")
    assert not_loaded == []
    for k in base:
        want = base[k].double() + 0.6 * (patched[k].double() - base[k].double())
        torch.testing.assert_close(half[k].double(), want, rtol=0, atol=2e-6, msg=k)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_comfyui_loads_the_diffusers_style_dora_file(tmp_path, axis) -> None:
    base, tuned = flux_pair(flux_shapes(), seed=4)
    cfg = ExtractConfig(rank=4, dora=axis, key_style="diffusers", output_dtype="bf16")
    path, report = _extract(tmp_path, base, tuned, cfg, False)
    stored = load_file(path)
    prefixes = {k.rsplit(".", 2)[0] for k in stored if k.endswith(".lora_A.weight")}
    assert prefixes and all(p + ".dora_scale" in stored for p in prefixes)
    # Each diffusers prefix onto its diffusers-named weight (and bias, via .diff_b).
    to_load = {"transformer." + k[:-len(".weight")]: k for k in base if k.endswith(".weight")}
    to_load.update({"transformer." + k: k for k in base if not k.endswith(".weight")})
    patched, not_loaded = _comfy(tmp_path, base, path, to_load, 1.0, "diffusers")
    assert not_loaded == []
    assert _check(report, base, tuned, patched, lambda k: k) == len(prefixes)
