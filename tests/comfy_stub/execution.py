"""Stub of how ComfyUI runs a node: its progress hook and its executor, reduced to one call.

What the real runtime does around a node's function, and the stub therefore does too:
- ``main.py``'s ``hijack_progress`` installs a global progress hook. Every
  ``comfy.utils.ProgressBar`` update calls it, and it calls
  ``comfy.model_management.throw_exception_if_processing_interrupted()`` first, so a Cancel is
  raised *from inside the progress update*; then it sends a ``progress`` message with the
  executing node's id (from the context variable, else the server's ``last_node_id``).
- ``execution.py``'s ``PromptExecutor.execute_async`` clears the interrupt flag when a prompt
  starts and runs the whole prompt under ``torch.inference_mode()``: tensors a node creates are
  inference tensors (no in-place update of them outside inference mode, no autograd).
- Hidden inputs: ``UNIQUE_ID`` is the node's id as a string. A V3 node (``io.ComfyNode``)
  gets them on the class clone it runs on (``cls.hidden.unique_id``; PROMPT ``{}`` and
  EXTRA_PNGINFO ``None`` outside a real prompt), a legacy node as keyword arguments.
- A V3 node's ``execute`` runs through ``EXECUTE_NORMALIZED`` on that locked clone; what the
  executor keeps is the output values (``NodeOutput.result``) and the ``ui`` dict.

``run_node`` (stub-only) does all of that for one node and returns ``{"result": ..., "ui": ...}``
as the executor takes them from the node (for a legacy node: what its function returned).
"""

from __future__ import annotations

from typing import Any

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io
from comfy_execution.utils import CurrentNodeContext, get_executing_context
from server import PromptServer


def hijack_progress(server_instance: PromptServer) -> None:
    """ComfyUI 0.3.64 ``main.hijack_progress`` (less previews): the hook that raises Cancel."""

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        executing_context = get_executing_context()
        if prompt_id is None and executing_context is not None:
            prompt_id = executing_context.prompt_id
        if node_id is None and executing_context is not None:
            node_id = executing_context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = server_instance.last_prompt_id
        if node_id is None:
            node_id = server_instance.last_node_id
        progress = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        server_instance.send_sync("progress", progress, server_instance.client_id)

    hook._stub_server = server_instance  # type: ignore[attr-defined]
    comfy.utils.set_progress_bar_global_hook(hook)


def _hidden_inputs(node_cls: type, node_id: str) -> dict[str, Any]:
    hidden = node_cls.INPUT_TYPES().get("hidden", {})
    return {name: node_id for name, kind in hidden.items() if kind == "UNIQUE_ID"}


def run_node(node_cls: type, inputs: dict[str, Any], node_id: str = "7",
             prompt_id: str = "stub-prompt") -> Any:
    """Run one node as ComfyUI's executor does; returns the node function's return value.

    Uses ``PromptServer.instance`` (a fresh recording one if there is none) and installs the
    progress hook on it unless it is already installed.
    """
    server = PromptServer.instance or PromptServer()
    hook = comfy.utils.PROGRESS_BAR_HOOK
    if getattr(hook, "_stub_server", None) is not server:
        hijack_progress(server)
    comfy.model_management.interrupt_current_processing(False)   # a new prompt starts
    server.last_prompt_id, server.last_node_id = prompt_id, node_id
    with torch.inference_mode(), CurrentNodeContext(prompt_id, node_id):
        if issubclass(node_cls, io.ComfyNode):
            return _run_v3(node_cls, inputs, node_id)
        kwargs = {**inputs, **_hidden_inputs(node_cls, node_id)}
        obj = node_cls()
        return getattr(obj, node_cls.FUNCTION)(**kwargs)


def _run_v3(node_cls: type, inputs: dict[str, Any], node_id: str) -> dict[str, Any]:
    schema = node_cls.GET_SCHEMA()
    given = {io.Hidden.unique_id: node_id, io.Hidden.prompt: {}, io.Hidden.extra_pnginfo: None}
    hidden = {h: given.get(h) for h in schema.hidden or []}
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    out = getattr(clone, node_cls.FUNCTION)(**inputs)
    return {"result": out.result, "ui": out.ui}
