"""Run inside ComfyUI's venv (cwd = ComfyUI root): apply LoRA files with ComfyUI's own loader code.

Usage: python comfy_apply_lora.py JOB.json, where JOB holds ``base`` (safetensors of weights by
model key), ``loras`` ([[file, strength], ...], applied in order), ``to_load`` (LoRA prefix ->
model key, as ComfyUI's key map would give) and ``out``. Writes the patched weights to ``out``
and prints a JSON line ``{"not_loaded": [...]}``: the keys ComfyUI's loader left unused.
"""

import json
import logging
import sys

from safetensors.torch import load_file, save_file

JOB = sys.argv[1]
sys.argv[1:] = ["--cpu"]   # ComfyUI parses the command line on import: run on the CPU

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.not_loaded = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.not_loaded.append(msg[len("lora key not loaded: "):])


def main() -> None:
    with open(JOB) as f:
        job = json.load(f)
    weights = {k: v.float() for k, v in load_file(job["base"]).items()}
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    for path, strength in job["loras"]:
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patches = comfy.lora.load_lora(lora, job["to_load"])
        for key, patch in patches.items():
            weights[key] = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)],
                                                       weights[key].clone(), key)
    save_file({k: v.contiguous() for k, v in weights.items()}, job["out"])
    print(json.dumps({"not_loaded": handler.not_loaded}))


if __name__ == "__main__":
    main()
