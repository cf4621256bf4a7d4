"""ComfyUI's node API (the V3 schema, ``comfy_api.latest``): the one module that imports it.

``comfy_adapter.py`` holds every call into ComfyUI's runtime (folders, models, progress) and
imports ComfyUI only inside its functions, so the model readers there work wherever the nodes
are not defined. The node classes, in contrast, must subclass ``io.ComfyNode`` when they are
defined; that import lives here, beside the code that turns the pack's option declarations
(``extract/option_spec.py``) into V3 inputs. The node modules import ``io`` from here, and the
pack imports the node modules only when ComfyUI asks for them (``comfy_entrypoint``), so the
command line never imports ComfyUI.

``comfy_api.latest`` is the same for what is used here from ComfyUI 0.3.64 on: ``io.ComfyNode``
with ``define_schema`` / ``execute``, ``io.Schema``, the widget inputs, ``io.Hidden`` and
``io.NodeOutput``; ``ComfyExtension`` with ``get_node_list``. Newer versions add input
arguments (``advanced``, ``raw_link``) that the pack does not use.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..extract.option_spec import Option

__all__ = ["ComfyExtension", "io", "option_input", "unique_id"]


def option_input(o: Option, **override: object) -> io.Input:
    """The V3 widget input for a declared option (``override``: e.g. another default)."""
    default = override.get("default", o.default)
    common = dict(optional=o.optional, tooltip=o.tooltip)
    if o.kind == "int":
        return io.Int.Input(o.name, default=default, min=o.min, max=o.max, step=o.step, **common)
    if o.kind == "float":
        return io.Float.Input(o.name, default=default, min=o.min, max=o.max, step=o.step,
                              **common)
    if o.kind == "bool":
        return io.Boolean.Input(o.name, default=default, **common)
    if o.kind == "choice":
        return io.Combo.Input(o.name, options=list(o.values()), default=default, **common)
    return io.String.Input(o.name, default=default, multiline=o.multiline, **common)


def unique_id(node_cls: type) -> str | None:
    """The running node's id (ComfyUI's hidden UNIQUE_ID); ``None`` outside an execution."""
    hidden = getattr(node_cls, "hidden", None)
    return None if hidden is None else hidden.unique_id
