"""Shared test helpers: constructed spectra and optimal truncation errors."""

from __future__ import annotations

import math

import torch


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


def module_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> torch.nn.Module:
    """A module tree whose state dict is ``sd`` (keys optionally re-prefixed), like the
    BaseModel ComfyUI wraps around the network; parameters, no gradients."""
    root = torch.nn.Module()
    for key, t in sd.items():
        parent = root
        *path, leaf = (prefix + key).split(".")
        for name in path:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
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
