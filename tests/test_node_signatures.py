"""What ComfyUI sends a node is what the node's function takes.

ComfyUI calls ``FUNCTION`` with one keyword argument per declared input (required, optional
and hidden). An input renamed on one side only is a TypeError in the user's queue, and a
widget default that differs from the function's default means the API (which may omit an
optional input) and the UI extract differently. Unit tests that call ``extract(**kwargs)``
directly see neither.
"""

from __future__ import annotations

import inspect

import pytest

from lora_extract import NODE_CLASS_MAPPINGS

SECTIONS = ("required", "optional", "hidden")


def _declared(cls) -> dict[str, tuple]:
    types = cls.INPUT_TYPES()
    return {name: spec for section in SECTIONS for name, spec in types.get(section, {}).items()}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_every_declared_input_is_a_parameter_and_back(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]  # no self
    assert set(_declared(cls)) == set(params)


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_widget_defaults_are_the_functions_defaults(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    sig = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    checked = 0
    for key, spec in _declared(cls).items():
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        default = sig[key].default
        if "default" in opts and default is not inspect.Parameter.empty:
            assert opts["default"] == default, (key, opts["default"], default)
            checked += 1
    if name in ("LoraExtract", "LoraExtractV2"):
        assert checked >= 5        # key_style, conv_rank, alpha, save_to, target_size_mb...


def _readme_defaults() -> dict[str, str]:
    """LoraExtract's input table in the README: name -> default as written."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    table = readme[readme.index("| input | default | meaning |"):]
    table = table[: table.index("\n\n")]
    out = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`( \(opt\.\))?", cells[0])
        if m and cells[1]:
            out[m.group(1)] = cells[1].split(" (")[0].strip("`")
    return out


def test_readme_table_states_the_node_defaults() -> None:
    """Every default the README's LoraExtract table states is the widget's default (and the
    widgets it lists all carry one), so the docs and a fresh node agree."""
    declared = _declared(NODE_CLASS_MAPPINGS["LoraExtract"])
    documented = _readme_defaults()
    assert len(documented) >= 12
    for name, text in documented.items():
        spec = declared[name]
        default = spec[1]["default"]
        shown = str(default).lower() if isinstance(default, bool) else f"{default:g}" \
            if isinstance(default, float) else str(default)
        assert shown == text, (name, default, text)
