"""The pack's quantized readers against ComfyUI's own code, run in ComfyUI's venv.

Runs when ``COMFYUI_ROOT`` and ``COMFY_VENV`` are set (skipped otherwise: CI has no ComfyUI).
``integration/comfy_dequant.py`` loads each file with ComfyUI's code and writes the float32
weights it computes; ours must be the same bit for bit (both are one float32 product of the
code value and its scale(s) per element, in the same order).
Scaled fp8 is read with ComfyUI's ``scaled_fp8_ops`` (0.3.64) or converted to ``comfy_quant``
layers by ``comfy.utils.convert_old_quants`` (newest); ``comfy_quant`` formats need a ComfyUI
whose venv has ``comfy.quant_ops`` with ``comfy_kitchen`` (the newest).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.extract.formats.dispatch import open_source
from tests.support.quant_files import mxfp8_example, nvfp4_example, write_comfy_quant, write_scaled_fp8

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(not (ROOT and VENV),
                                reason="COMFYUI_ROOT / COMFY_VENV not set (no real ComfyUI here)")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_dequant.py")


# Runs inside the real ComfyUI (cwd is its checkout), which must be on sys.path as its own main.py
# puts it: the one place a child edits sys.path.
PRELUDE = ("import importlib, sys; sys.path.insert(0, '.'); import comfy.cli_args; "
           "comfy.cli_args.args.cpu = True; ")


def _comfy_has(module: str, attr: str = "") -> bool:
    code = PRELUDE + f"m = importlib.import_module('{module}'); " + (f"m.{attr}" if attr else "")
    r = subprocess.run([os.path.join(VENV, "bin", "python"), "-c", code], cwd=ROOT,
                       capture_output=True, timeout=300)
    return r.returncode == 0


def _compare(path: str, tmp_path) -> int:
    out = str(tmp_path / "comfy.safetensors")
    r = subprocess.run([os.path.join(VENV, "bin", "python"), SCRIPT, path, out], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = load_file(out)
    ours = open_source(path)
    assert theirs
    for k, v in theirs.items():
        got = ours.get(k)
        assert got.shape == v.shape and torch.equal(got, v.float()), k
    return len(theirs)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.ff.weight": torch.randn(96, 64, generator=g) * 0.03 for i in range(3)}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_fp8_matches_comfyui(tmp_path, dtype) -> None:
    if not (_comfy_has("comfy.ops", "scaled_fp8_ops")
            or _comfy_has("comfy.utils", "convert_old_quants")):
        pytest.skip("this ComfyUI reads scaled fp8 neither with scaled_fp8_ops nor by converting it")
    path = str(tmp_path / "m.safetensors")
    write_scaled_fp8(path, _weights(1), {"blocks.0.norm.weight": torch.ones(64)}, dtype)
    assert _compare(path, tmp_path) == 3


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4",
                                 "mxfp8"])
def test_comfy_quant_matches_comfyui(tmp_path, fmt: str) -> None:
    if not (_comfy_has("comfy.quant_ops") or _comfy_has("comfy_kitchen.tensor")):
        pytest.skip("this ComfyUI has no per-layer quantization (comfy.quant_ops / comfy_kitchen)")
    path = str(tmp_path / "q.safetensors")
    if fmt in ("nvfp4", "mxfp8"):
        conf = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
        if fmt == "nvfp4":
            packed, blocked, ts, _ = nvfp4_example(130, 64)
            sd = {"l.weight": packed, "l.weight_scale": blocked, "l.weight_scale_2": ts}
        else:
            codes, scales, _ = mxfp8_example(40, 96)
            sd = {"l.weight": codes, "l.weight_scale": scales}
        save_file({**sd, "l.comfy_quant": conf}, path)
    else:
        write_comfy_quant(path, _weights(2), {}, fmt, in_header=fmt == "float8_e5m2")
    assert _compare(path, tmp_path) >= 1
