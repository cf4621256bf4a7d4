"""Tests of the model formats (``extract/formats/``, GGUF): quantized files read as ComfyUI reads them."""
