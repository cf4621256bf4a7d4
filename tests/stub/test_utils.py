"""The stub's ``comfy.utils`` (and ``comfy.float``) behave like ComfyUI 0.3.64: the progress
bar hook, attribute helpers, reading and writing model files."""

from __future__ import annotations

import comfy.float
import comfy.utils
import pytest
import torch

from tests.support.helpers import ToyBase

pytestmark = pytest.mark.usefixtures("fresh_comfy_stub")


def test_progress_bar_hook_clamp_and_record():
    calls = []
    early = comfy.utils.ProgressBar(5)  # created before the hook: never sees it
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append((v, t, preview, node_id)))
    bar = comfy.utils.ProgressBar(3, node_id="7")
    bar.update(1)
    bar.update(1)
    bar.update(5)  # clamped to total
    bar.update_absolute(2, total=10, preview="img")
    early.update(1)
    assert calls == [(1, 3, None, "7"), (2, 3, None, "7"), (3, 3, None, "7"), (2, 10, "img", "7")]
    assert bar.updates == [(1, 3), (2, 3), (3, 3), (2, 10)]
    assert comfy.utils._progress_log[-1] == (None, 1, 5)
    assert len(comfy.utils._progress_log) == 5


def test_attr_helpers_and_torch_files(tmp_path):
    m = ToyBase()
    w = comfy.utils.get_attr(m, "diffusion_model.lin.weight")
    assert w is m.diffusion_model.lin.weight
    old = comfy.utils.set_attr_param(m, "diffusion_model.lin.weight", torch.zeros(6, 8))
    assert old is w and not m.diffusion_model.lin.weight.requires_grad
    comfy.utils.copy_to_param(m, "diffusion_model.lin.weight", torch.ones(6, 8))
    assert m.diffusion_model.lin.weight.sum() == 48
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2, dtype=torch.float16)}
    path = str(tmp_path / "x.safetensors")
    comfy.utils.save_torch_file(sd, path, metadata={"k": "v"})
    back, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    assert meta == {"k": "v"} and set(back) == {"a", "b"} and back["b"].dtype == torch.float16
    pt = str(tmp_path / "x.pt")
    torch.save({"state_dict": sd}, pt)
    assert set(comfy.utils.load_torch_file(pt)) == {"a", "b"}
    assert comfy.float.stochastic_rounding(torch.ones(2), torch.bfloat16).dtype == torch.bfloat16
