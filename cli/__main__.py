"""``python -m lora_extract.cli``: the same as the ``lora-extract`` command."""

import sys

from .main import main

sys.exit(main())
