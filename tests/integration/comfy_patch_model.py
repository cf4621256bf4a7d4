"""Run inside ComfyUI's venv (cwd = ComfyUI root): load a diffusion-model file as ComfyUI does,
apply a LoRA file through ComfyUI's own key map and loader, save the patched weights.

Usage: python comfy_patch_model.py JOB.json, where JOB holds ``model`` (a diffusion-model
safetensors), ``lora``, ``strength`` and ``out``. The model is built by
``comfy.sd.load_diffusion_model`` (architecture detected from the keys; parameters the file lacks
exist all the same), the key map by ``comfy.lora.model_lora_keys_unet``, the patches by
``comfy.lora.load_lora`` and applied by ``ModelPatcher.patch_model``. Writes the patched
diffusion-model state dict (float32) to ``out`` and prints a JSON line with ``not_loaded`` (the
keys ComfyUI's loader left unused) and ``missing`` (model parameters the file lacked).
"""

import json
import logging
import sys

JOB = sys.argv[1]
sys.argv[1:] = ["--cpu"]   # ComfyUI parses the command line on import: run on the CPU

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.not_loaded = []
        self.missing = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.not_loaded.append(msg[len("lora key not loaded: "):])
        elif "missing" in msg.lower():
            self.missing.append(msg)


def main() -> None:
    with open(JOB) as f:
        job = json.load(f)
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    patcher = comfy.sd.load_diffusion_model(job["model"])
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
    patches = comfy.lora.load_lora(lora, key_map)
    patcher.add_patches(patches, job["strength"])
    patcher.patch_model()
    sd = patcher.model.diffusion_model.state_dict()
    save_file({k: v.float().contiguous() for k, v in sd.items()}, job["out"])
    print(json.dumps({"not_loaded": handler.not_loaded, "missing": handler.missing}))


if __name__ == "__main__":
    main()
