"""Stub of ``comfy_api.latest.io``: V3 node schemas, inputs, outputs, hidden inputs, node output.

How ComfyUI reads a V3 node, reduced to what the tests rely on:
- ``define_schema()`` returns a :class:`Schema`; ComfyUI finalizes it (an output node also
  receives the hidden PROMPT and EXTRA_PNGINFO; outputs without an id get ``_<i>_<TYPE>_``) and
  derives the V1 view from it: ``INPUT_TYPES()`` with ``required`` / ``optional`` / ``hidden``
  sections in declaration order, each input ``(io_type, options)`` with unset (``None``) options
  left out; combo inputs are ``("COMBO", {"options": [...], "multiselect": False, ...})``.
- ``RETURN_TYPES`` / ``RETURN_NAMES`` / ``OUTPUT_TOOLTIPS`` are lists (a name is the output's
  display name, else its type), ``FUNCTION`` is ``EXECUTE_NORMALIZED``.
- The executor runs ``execute`` on a clone of the class whose ``hidden`` holds the hidden
  inputs (``cls.hidden.unique_id``; an unknown name reads ``None``) and whose attributes cannot
  be set; a returned tuple, dict or ``None`` becomes a :class:`NodeOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


def _pruned(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """The hidden inputs of one execution, by name; names not given read ``None``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None

    @classmethod
    def from_dict(cls, d: dict | None) -> HiddenHolder:
        return cls({h.name: (d or {}).get(h) for h in Hidden})

    @classmethod
    def from_v3_data(cls, v3_data: dict | None) -> HiddenHolder:
        return cls.from_dict(v3_data["hidden_inputs"] if v3_data else None)


# --- inputs and outputs -------------------------------------------------------------------

class Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None,
                 extra_dict: dict | None = None) -> None:
        self.id, self.display_name, self.optional = id, display_name, optional
        self.tooltip, self.lazy, self.extra_dict = tooltip, lazy, extra_dict or {}

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "optional": self.optional,
                        "tooltip": self.tooltip, "lazy": self.lazy}) | _pruned(self.extra_dict)

    def get_io_type(self) -> str:
        return self.io_type


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                 socketless: bool | None = None, widget_type: str | None = None,
                 force_input: bool | None = None, extra_dict: dict | None = None) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default, self.socketless = default, socketless
        self.widget_type, self.force_input = widget_type, force_input

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _pruned({
            "default": self.default, "socketless": self.socketless,
            "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else self.io_type


class Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None,
                 tooltip: str | None = None, is_output_list: bool = False) -> None:
        self.id, self.display_name = id, display_name
        self.tooltip, self.is_output_list = tooltip, is_output_list

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip,
                        "is_output_list": self.is_output_list})


def _socket_type(io_type: str) -> type:
    """A type with plain ``Input`` / ``Output`` classes for ``io_type`` (MODEL, CLIP, IMAGE)."""
    return type(io_type.title(), (), {
        "io_type": io_type,
        "Input": type("Input", (Input,), {"io_type": io_type}),
        "Output": type("Output", (Output,), {"io_type": io_type}),
    })


Model = _socket_type("MODEL")
Clip = _socket_type("CLIP")
Image = _socket_type("IMAGE")


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        io_type = "BOOLEAN"

        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None,
                     default: bool | None = None, label_on: str | None = None,
                     label_off: str | None = None, socketless: bool | None = None,
                     force_input: bool | None = None) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless,
                             None, force_input)
            self.label_on, self.label_off = label_on, label_off

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"label_on": self.label_on,
                                                "label_off": self.label_off})

    class Output(Output):
        io_type = "BOOLEAN"


class _Number(WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                 min: Any = None, max: Any = None, step: Any = None,
                 socketless: bool | None = None, force_input: bool | None = None) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None,
                         force_input)
        self.min, self.max, self.step = min, max, step

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step})


class Int:
    io_type = "INT"

    class Input(_Number):
        io_type = "INT"

    class Output(Output):
        io_type = "INT"


class Float:
    io_type = "FLOAT"

    class Input(_Number):
        io_type = "FLOAT"

    class Output(Output):
        io_type = "FLOAT"


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        io_type = "STRING"

        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None,
                     multiline: bool = False, placeholder: str | None = None,
                     default: str | None = None, dynamic_prompts: bool | None = None,
                     socketless: bool | None = None, force_input: bool | None = None) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless,
                             None, force_input)
            self.multiline, self.placeholder = multiline, placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"multiline": self.multiline,
                                                "placeholder": self.placeholder,
                                                "dynamicPrompts": self.dynamic_prompts})

    class Output(Output):
        io_type = "STRING"


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        io_type = "COMBO"

        def __init__(self, id: str, options: list | None = None, display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None,
                     lazy: bool | None = None, default: Any = None,
                     control_after_generate: bool | None = None,
                     socketless: bool | None = None) -> None:
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.options, self.control_after_generate = options, control_after_generate

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({
                "multiselect": False, "options": self.options,
                "control_after_generate": self.control_after_generate})


# --- schema ---------------------------------------------------------------------------------

@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs or []] + [o.id for o in self.outputs or []]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"Input and output ids must be unique, but {dupes} are not.")

    def finalize(self) -> None:
        self.hidden = list(self.hidden or [])
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, o in enumerate(self.outputs or []):
            if o.id is None:
                o.id = f"_{i}_{o.io_type}_"

    def v1_inputs(self) -> dict[str, dict]:
        out: dict[str, dict] = {"required": {}}
        for i in self.inputs or []:
            spec = i.as_dict()
            spec.pop("optional", None)
            out.setdefault("optional" if i.optional else "required", {})[i.id] = \
                (i.get_io_type(), spec)
        for h in self.hidden or []:
            out.setdefault("hidden", {})[h.name] = (h.value,)
        return out

    def outputs_v1(self) -> dict[str, list]:
        outs = self.outputs or []
        return {"output": [o.io_type for o in outs],
                "output_is_list": [o.is_output_list for o in outs],
                "output_name": [o.display_name or o.io_type for o in outs],
                "output_tooltips": [o.tooltip or None for o in outs]}


class _ClassProperty:
    def __init__(self, fget) -> None:
        self.fget = fget

    def __get__(self, obj, owner):
        return self.fget(owner)


def _schema_attr(name: str) -> _ClassProperty:
    return _ClassProperty(lambda cls: cls._v1_attrs()[name])


class ComfyNode:
    """Base class of V3 nodes: ``define_schema`` and ``execute`` are classmethods."""

    hidden: HiddenHolder | None = None
    RELATIVE_PYTHON_MODULE: str | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    # --- what ComfyUI reads ------------------------------------------------------------------

    @classmethod
    def FINALIZE_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        for name in ("define_schema", "execute"):
            if getattr(cls, name).__func__ is getattr(ComfyNode, name).__func__:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        # (0.3.64 also takes include_hidden / return_schema; newer versions take no argument.)
        return cls.FINALIZE_SCHEMA().v1_inputs()

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:
        schema = cls.GET_SCHEMA()
        inputs = schema.v1_inputs()
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                **schema.outputs_v1(), "name": schema.node_id,
                "display_name": schema.display_name, "description": schema.description,
                "python_module": cls.RELATIVE_PYTHON_MODULE or "nodes",
                "category": schema.category, "output_node": schema.is_output_node,
                "deprecated": schema.is_deprecated, "experimental": schema.is_experimental,
                "api_node": schema.is_api_node}

    @classmethod
    def _v1_attrs(cls) -> dict[str, Any]:
        schema = cls.GET_SCHEMA()
        outs = schema.outputs_v1()
        return {"DESCRIPTION": schema.description, "CATEGORY": schema.category,
                "OUTPUT_NODE": schema.is_output_node, "RETURN_TYPES": outs["output"],
                "RETURN_NAMES": outs["output_name"], "OUTPUT_IS_LIST": outs["output_is_list"],
                "OUTPUT_TOOLTIPS": outs["output_tooltips"]}

    DESCRIPTION = _schema_attr("DESCRIPTION")
    CATEGORY = _schema_attr("CATEGORY")
    OUTPUT_NODE = _schema_attr("OUTPUT_NODE")
    RETURN_TYPES = _schema_attr("RETURN_TYPES")
    RETURN_NAMES = _schema_attr("RETURN_NAMES")
    OUTPUT_IS_LIST = _schema_attr("OUTPUT_IS_LIST")
    OUTPUT_TOOLTIPS = _schema_attr("OUTPUT_TOOLTIPS")
    FUNCTION = _ClassProperty(lambda cls: "EXECUTE_NORMALIZED")

    # --- how ComfyUI runs it -------------------------------------------------------------------

    @classmethod
    def PREPARE_CLASS_CLONE(cls, v3_data: dict | None) -> type[ComfyNode]:
        # Newer ComfyUI passes {"hidden_inputs": {...}, ...}; 0.3.64 the hidden inputs themselves.
        hidden = (v3_data or {}).get("hidden_inputs", v3_data)
        clone = type(f"{cls.__name__}Clone", (cls,), {})
        clone.hidden = HiddenHolder.from_dict(hidden)
        return _locked(clone)

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        out = cls.execute(*args, **kwargs)
        if out is None:
            return NodeOutput()
        if isinstance(out, NodeOutput):
            return out
        if isinstance(out, tuple):
            return NodeOutput(*out)
        if isinstance(out, dict):
            return NodeOutput.from_dict(out)
        raise Exception(f"Invalid return type from node: {type(out)}")


class _LockedMeta(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"Cannot set attribute '{name}' on locked class '{cls.__name__}'")


def _locked(cls: type) -> type:
    """``cls`` under a metaclass that refuses attribute assignment (the executor's lock)."""
    return _LockedMeta(cls.__name__, (cls,), {})


class NodeOutput:
    """A node's result: output values by position, plus ``ui`` (shown on the node)."""

    def __init__(self, *args: Any, ui: dict | None = None, expand: dict | None = None,
                 block_execution: str | None = None) -> None:
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self) -> tuple | None:
        return self.args if self.args else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeOutput:
        return cls(*data.get("result", ()), ui=data.get("ui"), expand=data.get("expand"))

    def __getitem__(self, index: int) -> Any:
        return self.args[index]
