"""A stand-in for ComfyUI-GGUF in the stub tests, written from its loader/ops/nodes behaviour.

What the pack's MODEL reading meets in ComfyUI-GGUF and this package reproduces: weights are
``GGMLTensor`` objects (block bytes as data, ``tensor_type``/``tensor_shape`` attributes, a
``.shape`` that answers ``tensor_shape``, ``detach``/``clone`` returning the tensor itself);
their layers save a placeholder state dict (``meta`` tensors of the byte shape, and a
``temp.weight`` on the largest layer); the patcher keeps LoRA patches of a quantized weight on
the weight (``weight.patches``) instead of patching it, with no backup; and the package's
``dequant.dequantize_tensor(tensor, dtype, dequant_dtype)`` gives floats (here through the
``gguf`` package's reference dequantizers, not the pack's code).
"""
