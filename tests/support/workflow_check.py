"""Check ComfyUI workflow files (UI and API format) against node input definitions.

Our nodes' definitions come from their ``INPUT_TYPES``/``RETURN_TYPES``; the ComfyUI core nodes
the examples use come from ``tests/support/comfy_core_nodes.json`` (``/object_info`` of ComfyUI 0.3.64).
``ui_to_api`` converts a UI-format workflow the way the frontend's "Export (API)" does for
the graphs we ship (active nodes only, widget values in input order, links as ``[id, slot]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

CORE_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_core_nodes.json")
WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING")
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
FRONTEND_ONLY = ("Note", "MarkdownNote")
MODE_ACTIVE, MODE_MUTED = 0, 2


@dataclass(frozen=True)
class InputDef:
    name: str
    type: object                    # "INT", "MODEL", a list of combo values, or "FILES"
    opts: dict
    optional: bool

    @property
    def is_widget(self) -> bool:
        if isinstance(self.type, list) or self.type in ("FILES", "COMBO"):
            return True
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput")

    @property
    def controls(self) -> int:
        """Extra widget values the frontend stores after this one (seed 'randomize')."""
        return 1 if self.opts.get("control_after_generate") else 0

    @property
    def socket_type(self) -> str:
        if isinstance(self.type, list) or self.type == "FILES":
            return "COMBO"
        return str(self.type)


@dataclass
class NodeDef:
    inputs: list[InputDef] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    output_node: bool = False

    def input(self, name: str) -> InputDef | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> list[InputDef]:
        return [i for i in self.inputs if i.is_widget]

    @property
    def sockets(self) -> list[InputDef]:
        return [i for i in self.inputs if not i.is_widget]


def _inputs(input_types: dict) -> list[InputDef]:
    out = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = spec[0]
            if kind == "COMBO" and "options" in opts:
                # A V3 combo ("COMBO", {"options": [...]}) is the legacy (list, {...}) combo to
                # the frontend and the executor: same widget, same value check.
                kind = list(opts["options"])
            out.append(InputDef(name, kind, opts, section == "optional"))
    return out


PROBE = "__lora_extract_probe__.safetensors"


def _file_combos(node_class_mappings: dict[str, type], model_dirs: list[str]) -> dict[tuple[str, str], list]:
    """Combo inputs whose choices are model files: (node, input) -> the choices that are not files.

    Found by listing the definitions with and without a probe file in every model folder: a
    combo that gains the probe lists files (its other choices, like '(none)', are fixed).
    """
    before = {name: _inputs(cls.INPUT_TYPES()) for name, cls in node_class_mappings.items()}
    made = []
    for d in model_dirs:
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, PROBE)
        open(path, "wb").close()
        made.append(path)
    try:
        after = {name: _inputs(cls.INPUT_TYPES()) for name, cls in node_class_mappings.items()}
    finally:
        for path in made:
            os.remove(path)
    found: dict[tuple[str, str], list] = {}
    for name, inputs in after.items():
        for inp, old in zip(inputs, before[name], strict=True):
            if isinstance(inp.type, list) and PROBE in inp.type:
                found[(name, inp.name)] = list(old.type)
    return found


def load_definitions(node_class_mappings: dict[str, type], model_dirs: list[str] = ()) -> dict[str, NodeDef]:
    """Definitions of the core nodes we use and of ``node_class_mappings``.

    ``model_dirs``: the (empty, test-only) model folders the nodes list files from; combos over
    them become ``FILES`` inputs (any model file name, or one of their fixed choices).
    """
    files = _file_combos(node_class_mappings, list(model_dirs)) if model_dirs else {}
    defs: dict[str, NodeDef] = {}
    with open(CORE_NODES, encoding="utf-8") as f:
        for name, d in json.load(f)["nodes"].items():
            defs[name] = NodeDef(_inputs(d["input"]), list(zip(d["output_name"], d["output"], strict=True)),
                                 bool(d["output_node"]))
    for name, cls in node_class_mappings.items():
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        inputs = [InputDef(i.name, "FILES", {**i.opts, "fixed": files[(name, i.name)]}, i.optional)
                  if (name, i.name) in files else i for i in _inputs(cls.INPUT_TYPES())]
        defs[name] = NodeDef(inputs, list(zip(names, cls.RETURN_TYPES, strict=True)),
                             bool(getattr(cls, "OUTPUT_NODE", False)))
    return defs


def check_value(where: str, inp: InputDef, value: object) -> list[str]:
    """Problems with one widget value (empty list: valid)."""
    t = inp.type
    if isinstance(t, list):
        return [] if value in t else [f"{where}: {value!r} is not one of {t}"]
    if t == "FILES":
        ok = isinstance(value, str) and (value in inp.opts.get("fixed", ())
                                         or value.lower().endswith(MODEL_EXTENSIONS))
        return [] if ok else [f"{where}: {value!r} is not a model file name"]
    if t == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if t == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: {value!r} is not a number"]
        if t == "INT" and not isinstance(value, int):
            return [f"{where}: {value!r} is not an integer"]
        lo, hi = inp.opts.get("min", -math.inf), inp.opts.get("max", math.inf)
        return [] if lo <= value <= hi else [f"{where}: {value!r} is outside [{lo}, {hi}]"]
    return [f"{where}: {t} is not a widget type"]


def check_ui(wf: dict, defs: dict[str, NodeDef]) -> list[str]:
    """Problems with a UI-format workflow (empty list: valid)."""
    errors: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in wf:
            errors.append(f"missing top-level {key!r}")
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    if len(nodes) != len(wf.get("nodes", [])):
        errors.append("duplicate node ids")
    if nodes and wf.get("last_node_id", 0) < max(nodes):
        errors.append("last_node_id is below the largest node id")
    links = {ln[0]: ln for ln in wf.get("links", [])}
    if links and wf.get("last_link_id", 0) < max(links):
        errors.append("last_link_id is below the largest link id")
    for link_id, from_id, from_slot, to_id, to_slot, typ in links.values():
        src, dst = nodes.get(from_id), nodes.get(to_id)
        if src is None or dst is None:
            errors.append(f"link {link_id}: unknown node")
            continue
        outs, ins = src.get("outputs", []), dst.get("inputs", [])
        if from_slot >= len(outs) or link_id not in (outs[from_slot].get("links") or []):
            errors.append(f"link {link_id}: not listed on node {from_id} output {from_slot}")
        elif outs[from_slot]["type"] != typ:
            errors.append(f"link {link_id}: type {typ} but output is {outs[from_slot]['type']}")
        if to_slot >= len(ins) or ins[to_slot].get("link") != link_id:
            errors.append(f"link {link_id}: not listed on node {to_id} input {to_slot}")
        elif ins[to_slot]["type"] not in (typ, "*"):
            errors.append(f"link {link_id}: type {typ} into a {ins[to_slot]['type']} input")
    for n in nodes.values():
        where = f"node {n['id']} ({n.get('type')})"
        if n.get("type") in FRONTEND_ONLY:
            continue
        d = defs.get(n.get("type"))
        if d is None:
            errors.append(f"{where}: unknown node type")
            continue
        if n.get("mode", 0) not in (MODE_ACTIVE, MODE_MUTED):
            errors.append(f"{where}: mode {n.get('mode')} (only active or muted are used)")
        values = list(n.get("widgets_values", []))
        expected = sum(1 + w.controls for w in d.widgets)
        if len(values) != expected:
            errors.append(f"{where}: {len(values)} widget values, the node has {expected}")
        else:
            for w in d.widgets:
                errors.extend(check_value(f"{where} {w.name}", w, values.pop(0)))
                del values[: w.controls]
        for i in n.get("inputs", []):
            spec = d.input(i["name"])
            if spec is None:
                errors.append(f"{where}: unknown input {i['name']!r}")
            elif i["type"] != spec.socket_type:
                errors.append(f"{where}: input {i['name']} is {i['type']}, defined {spec.socket_type}")
        listed = {i["name"]: i for i in n.get("inputs", [])}
        for s in d.sockets:
            if not s.optional and n.get("mode", 0) == MODE_ACTIVE and listed.get(s.name, {}).get("link") is None:
                errors.append(f"{where}: required input {s.name} is not connected")
        outs = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        if outs != d.outputs:
            errors.append(f"{where}: outputs {outs} != defined {d.outputs}")
    return errors


def ui_to_api(wf: dict, defs: dict[str, NodeDef]) -> dict[str, dict]:
    """The API-format prompt for the active nodes of a UI-format workflow."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {ln[0]: ln for ln in wf["links"]}
    api: dict[str, dict] = {}
    for n in wf["nodes"]:
        if n.get("type") in FRONTEND_ONLY or n.get("mode", 0) != MODE_ACTIVE:
            continue
        d = defs[n["type"]]
        values = list(n.get("widgets_values", []))
        inputs: dict[str, object] = {}
        for w in d.widgets:
            inputs[w.name] = values.pop(0)
            del values[: w.controls]
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                _id, from_id, from_slot, _to, _slot, _t = links[i["link"]]
                if nodes[from_id].get("mode", 0) == MODE_ACTIVE:
                    inputs[i["name"]] = [str(from_id), from_slot]
        api[str(n["id"])] = {"inputs": inputs, "class_type": n["type"],
                             "_meta": {"title": n.get("title") or n["type"]}}
    return api


def check_api(prompt: dict, defs: dict[str, NodeDef]) -> list[str]:
    """Problems with an API-format prompt (empty list: valid)."""
    errors: list[str] = []
    if not any(defs.get(n.get("class_type"), NodeDef()).output_node for n in prompt.values()):
        errors.append("no output node: ComfyUI would run nothing")
    for node_id, n in prompt.items():
        where = f"node {node_id} ({n.get('class_type')})"
        d = defs.get(n.get("class_type"))
        if d is None:
            errors.append(f"{where}: unknown node type")
            continue
        for name, value in n.get("inputs", {}).items():
            spec = d.input(name)
            if spec is None:
                errors.append(f"{where}: unknown input {name!r}")
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None:
                    errors.append(f"{where} {name}: links to missing node {value[0]}")
                    continue
                src_def = defs.get(src["class_type"])
                if src_def is None or value[1] >= len(src_def.outputs):
                    errors.append(f"{where} {name}: bad output slot {value[1]}")
                elif src_def.outputs[value[1]][1] != spec.socket_type:
                    errors.append(f"{where} {name}: {src_def.outputs[value[1]][1]} into {spec.socket_type}")
            elif spec.is_widget:
                errors.extend(check_value(f"{where} {name}", spec, value))
            else:
                errors.append(f"{where} {name}: socket input given a value {value!r}")
        for spec in d.inputs:
            if not spec.optional and spec.name not in n.get("inputs", {}):
                errors.append(f"{where}: required input {spec.name} missing")
    return errors
