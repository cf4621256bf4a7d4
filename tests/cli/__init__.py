"""Tests of the command line (``cli/``, ``lora-extract``)."""
