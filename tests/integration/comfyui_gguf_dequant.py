"""Run in ComfyUI's venv: a .gguf file loaded and dequantized by ComfyUI-GGUF itself.

    python comfyui_gguf_dequant.py COMFYUI_ROOT COMFYUI_GGUF_DIR FILE.gguf OUT.safetensors

Writes every tensor of ComfyUI-GGUF's state dict (``gguf_sd_loader``) as float32, dequantized
by its ``dequantize_tensor`` twice: ``dequant_dtype=float32`` under the key, and its default
(float16 block arithmetic for quantized types) under ``<key>@default``.
"""

from __future__ import annotations

import importlib
import os
import sys
import types


def main() -> None:
    root, gguf_dir, path, out = sys.argv[1:5]
    sys.path.insert(0, root)  # runs inside the real ComfyUI: its checkout is its import root
    os.chdir(root)
    sys.argv = sys.argv[:1] + ["--cpu"]  # no GPU needed; ComfyUI reads its options at import
    import comfy.options

    comfy.options.enable_args_parsing()
    # The folder name has a dash: import its modules as a package without running its
    # __init__ (which registers nodes and needs the server).
    pkg = types.ModuleType("comfyui_gguf")
    pkg.__path__ = [gguf_dir]
    sys.modules["comfyui_gguf"] = pkg
    loader = importlib.import_module("comfyui_gguf.loader")
    dequant = importlib.import_module("comfyui_gguf.dequant")
    import torch
    from safetensors.torch import save_file

    sd = loader.gguf_sd_loader(path)
    res = {}
    for k, v in sd.items():
        exact = dequant.dequantize_tensor(v, dtype=torch.float32, dequant_dtype=torch.float32)
        default = dequant.dequantize_tensor(v, dtype=torch.float32)
        res[k] = torch.Tensor(exact).reshape(tuple(v.shape)).contiguous().clone()
        res[k + "@default"] = torch.Tensor(default).reshape(tuple(v.shape)).contiguous().clone()
    save_file(res, out)
    print(len(sd))


if __name__ == "__main__":
    main()
