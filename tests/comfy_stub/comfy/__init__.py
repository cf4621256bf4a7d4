"""Test stub of ComfyUI's ``comfy`` package (ComfyUI 0.3.64 behaviour, pure torch).

Only what a LoRA-extraction node pack calls is provided: ``comfy.model_patcher``,
``comfy.lora``, ``comfy.weight_adapter``, ``comfy.utils``, ``comfy.model_management`` and
``comfy.float``. The real ``comfy`` is a namespace package with no ``__init__``; this file
exists only so the stub is an ordinary package.
"""
