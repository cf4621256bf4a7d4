"""LoKr, LoHa, DoRA and .diff files, and merges, against the real ComfyUI's loader code.

Runs when ``COMFYUI_ROOT`` (a ComfyUI checkout) and ``COMFY_VENV`` (its virtual environment) are
set; skipped otherwise. ComfyUI's own ``comfy.lora.load_lora`` + ``calculate_weight`` patch the
weights in a subprocess (``integration/comfy_apply_lora.py``). Checks, per layer:

1. ComfyUI's change from the original adapter file equals our :func:`dense_change`;
2. ComfyUI applying our converted / merged LoRA gives the weights ComfyUI gives for the
   original file(s) at the same strengths;
3. ComfyUI's loader leaves no key of either file unused ("lora key not loaded").
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.resize import BaseModel, ResizeOptions, open_lora_input, parse_recipes, resize_lora
from lora_extract.resize.adapters import dense_change
from lora_extract.resize.lora_file import read_lora_file
from tests.resize.test_merge_convert import ATTN1, COMFY, CONV, FF, KOHYA
from tests.support.resize_fixtures import UNET, kohya_layer, lora_pair, make_base, spectrum

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(not (ROOT and VENV), reason="COMFYUI_ROOT / COMFY_VENV not set (no real ComfyUI)")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_apply_lora.py")
TO_LOAD = {**{KOHYA[n]: UNET + n + ".weight" for n in KOHYA}, **{COMFY[n]: UNET + n + ".weight" for n in COMFY}}


def _comfy(tmp_path, base_path: str, loras: list[tuple[str, float]], tag: str) -> tuple[dict, list[str]]:
    job = {"base": base_path, "loras": [[p, s] for p, s in loras], "to_load": TO_LOAD,
           "out": str(tmp_path / f"{tag}_patched.safetensors")}
    job_path = tmp_path / f"{tag}_job.json"
    job_path.write_text(json.dumps(job))
    res = subprocess.run([os.path.join(VENV, "bin", "python"), SCRIPT, str(job_path)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERROR" not in res.stderr, res.stderr[-3000:]   # ComfyUI logs a failed patch and skips it
    report = json.loads(res.stdout.strip().splitlines()[-1])
    return load_file(job["out"]), report["not_loaded"]


def _tucker_lokr(r) -> dict[str, torch.Tensor]:
    """LoKr with a CP (Tucker) w2 on the 3x3 conv."""
    return {KOHYA[CONV] + ".lokr_w1": r(2, 2), KOHYA[CONV] + ".lokr_w2_a": r(2, 8),
            KOHYA[CONV] + ".lokr_w2_b": r(2, 8), KOHYA[CONV] + ".lokr_t2": r(2, 2, 3, 3),
            KOHYA[CONV] + ".alpha": torch.tensor(2.0)}


def _adapter_file(tmp_path, gen, base) -> str:
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    w_ff = base[UNET + FF + ".weight"]
    sd = {
        KOHYA[ATTN1] + ".lokr_w1": r(4, 4), KOHYA[ATTN1] + ".lokr_w2_a": r(8, 3),
        KOHYA[ATTN1] + ".lokr_w2_b": r(3, 8), KOHYA[ATTN1] + ".alpha": torch.tensor(1.5),
        # LoKr with both factors whole on the conv
        KOHYA[CONV] + ".lokr_w1": r(2, 2), KOHYA[CONV] + ".lokr_w2": r(8, 8, 3, 3),
        # LoHa + DoRA (input axis) on the feed-forward
        KOHYA[FF] + ".hada_w1_a": r(128, 2), KOHYA[FF] + ".hada_w1_b": r(2, 32),
        KOHYA[FF] + ".hada_w2_a": r(128, 2), KOHYA[FF] + ".hada_w2_b": r(2, 32),
        KOHYA[FF] + ".alpha": torch.tensor(1.0),
        KOHYA[FF] + ".dora_scale": (w_ff.norm(dim=0) * (1 + 0.1 * r(32))).reshape(1, 32),
    }
    path = str(tmp_path / "lyco.safetensors")
    save_file(sd, path)
    return path


def _dora_file(tmp_path, gen, base) -> str:
    """Plain LoRA + DoRA on the output axis, and a full difference."""
    up, down = lora_pair(32, (32,), spectrum(4, 0.5), gen, 4.0)
    w = base[UNET + ATTN1 + ".weight"]
    sd = {COMFY[ATTN1] + ".lora_up.weight": up, COMFY[ATTN1] + ".lora_down.weight": down,
          COMFY[ATTN1] + ".alpha": torch.tensor(4.0),
          COMFY[ATTN1] + ".dora_scale": (w.norm(dim=1) * 1.1).reshape(32, 1),
          COMFY[FF] + ".diff": torch.randn(128, 32, generator=gen) * 0.01}
    path = str(tmp_path / "dora.safetensors")
    save_file(sd, path)
    return path


def _convert(base_path, spec, out) -> str:
    report = resize_lora(BaseModel.open(base_path), open_lora_input(spec), parse_recipes("rank=10000"),
                         str(out), ResizeOptions(output_dtype="fp32"))
    return report.outcomes[0].output_path


@pytest.mark.parametrize("maker", [_adapter_file, _dora_file])
def test_conversion_matches_comfyui(tmp_path, gen, maker) -> None:
    base_path, base = make_base(str(tmp_path), gen)
    src = maker(tmp_path, gen, base)
    theirs, unused = _comfy(tmp_path, base_path, [(src, 0.7)], "orig")
    assert unused == []
    # 1. the change we compute is ComfyUI's
    f = read_lora_file(src)
    bm = BaseModel.open(base_path)
    for prefix, m in f.dense.items():
        key = TO_LOAD[prefix]
        w = base[key].float()
        ours = dense_change(m, f.tensor, tuple(w.shape), lambda w=w: w)
        torch.testing.assert_close(theirs[key] - w, 0.7 * ours, atol=2e-6, rtol=1e-4, msg=prefix)
    del bm
    # 2. our converted LoRA (strength folded in) patches to the same weights in ComfyUI
    converted = _convert(base_path, f"{src}:0.7", tmp_path / "conv")
    again, unused = _comfy(tmp_path, base_path, [(converted, 1.0)], "conv")
    assert unused == []
    for prefix in f.dense:
        key = TO_LOAD[prefix]
        torch.testing.assert_close(again[key], theirs[key], atol=5e-6, rtol=1e-4, msg=prefix)


def test_merge_matches_comfyui_stacking_the_loras(tmp_path, gen) -> None:
    base_path, base = make_base(str(tmp_path), gen)
    a: dict[str, torch.Tensor] = {}
    kohya_layer(a, KOHYA[ATTN1], *lora_pair(32, (32,), spectrum(4, 0.3), gen, 2.0), 2.0)
    kohya_layer(a, KOHYA[CONV], *lora_pair(16, (16, 3, 3), spectrum(4, 0.2), gen, 2.0), 2.0)
    b: dict[str, torch.Tensor] = {}
    b[COMFY[ATTN1] + ".lora_B.weight"], b[COMFY[ATTN1] + ".lora_A.weight"] = lora_pair(32, (32,), spectrum(6, 0.5), gen)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    lyco = _adapter_file(tmp_path, gen, base)
    spec = f"{tmp_path / 'a.safetensors'}:0.7,{tmp_path / 'b.safetensors'}:-0.4,{lyco}:0.5"
    merged = _convert(base_path, spec, tmp_path / "m")
    stacked, unused = _comfy(tmp_path, base_path, [(str(tmp_path / "a.safetensors"), 0.7),
                                                   (str(tmp_path / "b.safetensors"), -0.4), (lyco, 0.5)], "stack")
    assert unused == []
    ours, unused = _comfy(tmp_path, base_path, [(merged, 1.0)], "merged")
    assert unused == []
    assert not any(k.startswith(COMFY[ATTN1]) for k in load_file(merged))   # one layer per weight
    for key in sorted({TO_LOAD[p] for p in (KOHYA[ATTN1], KOHYA[CONV], KOHYA[FF])}):
        delta = (stacked[key] - base[key]).double().numpy()
        np.testing.assert_allclose((ours[key] - base[key]).double().numpy(), delta,
                                   atol=1e-5 * np.abs(delta).max(), err_msg=key)


def test_tucker_lokr_fails_in_comfyui_and_its_conversion_loads(tmp_path, gen) -> None:
    """ComfyUI's LoKr path calls torch.kron on the strided CP product and logs an error instead
    of patching the layer; our conversion forms the change LoKr defines and loads cleanly."""
    base_path, base = make_base(str(tmp_path), gen)
    sd = _tucker_lokr(lambda *s: torch.randn(*s, generator=gen) * 0.2)
    src = str(tmp_path / "tucker.safetensors")
    save_file(sd, src)
    job_failed = False
    try:
        _comfy(tmp_path, base_path, [(src, 1.0)], "tucker")
    except AssertionError as e:
        job_failed = "ERROR lokr" in str(e)
    if not job_failed:
        pytest.skip("this ComfyUI/torch applies Tucker LoKr; covered by the exact comparison instead")
    converted = _convert(base_path, src, tmp_path / "conv")
    patched, unused = _comfy(tmp_path, base_path, [(converted, 1.0)], "tucker_conv")
    assert unused == []
    key = TO_LOAD[KOHYA[CONV]]
    w2 = np.einsum("ijkl,jr,ip->prkl", *(sd[KOHYA[CONV] + s].double().numpy() for s in (".lokr_t2", ".lokr_w2_b", ".lokr_w2_a")))
    want = 2.0 / 2 * np.kron(sd[KOHYA[CONV] + ".lokr_w1"].double().numpy()[:, :, None, None], w2)
    np.testing.assert_allclose((patched[key] - base[key]).double().numpy(), want, atol=1e-5 * np.abs(want).max())
