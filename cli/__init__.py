"""``lora-extract``: the pack's command line (extract, demo, validate, resize), without ComfyUI."""

import gc

# Start-up: importing torch creates a few hundred thousand objects, none of them garbage, and
# the cyclic collector's passes over them during the import cost ~0.14 s of every run (2-core
# CPU, torch's import ~1.0 s with them). Collection is back on as soon as the imports are done.
_collecting = gc.isenabled()
gc.disable()
try:
    from .main import main, run_as_process  # noqa: E402
finally:
    if _collecting:
        gc.enable()

__all__ = ["main", "run_as_process"]
