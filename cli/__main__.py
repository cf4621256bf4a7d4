"""``python -m lora_extract.cli``: the same as the ``lora-extract`` command."""

from .main import run_as_process

run_as_process()
