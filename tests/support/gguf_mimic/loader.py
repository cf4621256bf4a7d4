"""A MODEL from a .gguf file the way UnetLoaderGGUF builds one (linear layers only)."""

from __future__ import annotations

import warnings

import gguf
import torch

from .dequant import is_quantized
from .ops import GGMLLinear, GGMLTensor
from .patcher import GGUFModelPatcher


def gguf_state_dict(path: str) -> dict[str, GGMLTensor]:
    reader = gguf.GGUFReader(path)
    sd = {}
    for t in reader.tensors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.from_numpy(t.data)
        shape = torch.Size(int(v) for v in reversed(t.shape))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(*shape)
        sd[t.name] = GGMLTensor(data, tensor_type=t.tensor_type, tensor_shape=shape)
    return sd


def load_gguf_model(path: str) -> GGUFModelPatcher:
    """Modules ``diffusion_model.<layer>`` with GGML weights (each layer: weight [+ bias])."""
    sd = gguf_state_dict(path)
    root = torch.nn.Module()
    net = torch.nn.Module()
    root.add_module("diffusion_model", net)
    layers = sorted({k.rpartition(".")[0] for k in sd})
    for name in layers:
        parent = net
        *path_, leaf = name.split(".")
        for p in path_:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, GGMLLinear(sd[name + ".weight"], sd.get(name + ".bias")))
    quantized = [n for n in layers if is_quantized(sd[n + ".weight"])]
    if quantized:
        largest = max(quantized, key=lambda n: sd[n + ".weight"].numel())
        net.get_submodule(largest).largest_layer = True
    return GGUFModelPatcher(root, torch.device("cpu"), torch.device("cpu"))
