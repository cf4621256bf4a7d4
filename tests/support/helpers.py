"""Shared test helpers: constructed spectra, optimal truncation errors, and small models as
ComfyUI wraps them (a toy BaseModel, patched pairs)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the stub is importable only with pytest's pythonpath (pyproject.toml)
    from comfy.model_patcher import ModelPatcher


def matrix_with_spectrum(m: int, n: int, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random m x n matrix whose singular values are exactly ``sigma`` (padded with zeros)."""
    k = sigma.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return ((u * sigma.double()) @ v.T).float()


def optimal_rel_error(a: torch.Tensor, k: int) -> float:
    """Eckart-Young: the best rank-k relative Frobenius error of ``a``."""
    s = torch.linalg.svdvals(a.reshape(a.shape[0], -1).double())
    return math.sqrt(float((s[k:] ** 2).sum())) / math.sqrt(float((s ** 2).sum()))


def module_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "",
                           buffers: tuple[str, ...] = ()) -> torch.nn.Module:
    """A module tree whose state dict is ``sd`` (keys optionally re-prefixed), like the
    BaseModel ComfyUI wraps around the network; parameters, no gradients (the keys in
    ``buffers``, e.g. a model's ``sigmas``, as buffers)."""
    root = torch.nn.Module()
    for key, t in sd.items():
        parent = root
        *path, leaf = (prefix + key).split(".")
        for name in path:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        if key in buffers:
            parent.register_buffer(leaf, t.clone())
        else:
            parent.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def patched_pair(width: int, seed: int):
    """A demo base/fine-tuned pair as ComfyUI sees it: one module, the fine-tune as weight-diff
    patches on a clone. Returns (base_sd, tuned_sd, base_patcher, tuned_patcher)."""
    from comfy.model_patcher import ModelPatcher

    from lora_extract.extract.synthetic import demo_layers, make_pair

    base, tuned = make_pair(demo_layers(width), seed=seed)
    patcher = ModelPatcher(module_from_state_dict(base), torch.device("cpu"), torch.device("cpu"))
    tuned_patcher = patcher.clone()
    tuned_patcher.add_patches({k: (tuned[k] - base[k],) for k in base})
    return base, tuned, patcher, tuned_patcher


class ToyNet(nn.Module):
    """A small diffusion net: linear, conv 3x3, conv 1x1, conv3d, norm, and a non-leaf param."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 5, 1)
        self.conv3d = nn.Conv3d(3, 4, (2, 3, 3))
        self.norm = nn.LayerNorm(6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6, bias=False)])
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 6))  # owned by a module with children


class ToyBase(nn.Module):
    """Like comfy.model_base.BaseModel: the net lives at ``.diffusion_model``."""

    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = ToyNet()
        self.register_buffer("sigmas", torch.linspace(0, 1, 4))  # a non-diffusion key


def make_toy_patcher(seed: int = 0, dtype: torch.dtype = torch.float32) -> ModelPatcher:
    """A ComfyUI ModelPatcher around a seeded ToyBase, on the CPU (the stub's only device)."""
    from comfy.model_patcher import ModelPatcher

    torch.manual_seed(seed)
    return ModelPatcher(ToyBase().to(dtype), torch.device("cpu"), torch.device("cpu"))


def call_node(node_cls: type, *args, **inputs) -> dict:
    """Call a V3 node's ``execute`` as ComfyUI's executor does, outside a prompt (no progress
    hook, interrupt flag left as it is, hidden inputs ``None``): through ``EXECUTE_NORMALIZED`` on
    a locked clone of the class. Returns ``{"result": output values, "ui": ui dict}``."""
    out = node_cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(*args, **inputs)
    return {"result": out.result, "ui": out.ui}
