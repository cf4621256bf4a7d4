"""Each extraction option is declared once (extract/options.py, memory/options.py) and the node
inputs, the command-line flags, the config validation and the defaults follow from it."""

from __future__ import annotations

import dataclasses

import pytest

from lora_extract.cli.main import build_parser
from lora_extract.extract import rank_rules
from lora_extract.extract.config import ExtractConfig
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.extract.options import EXTRACT, EXTRACT_OPTIONS, lora_types
from lora_extract.memory.options import MEMORY_OPTIONS
from lora_extract.memory.planner import MemoryOptions
from lora_extract.nodes import NODE_CLASS_MAPPINGS


def _extract_parser_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s: a for a in sub.choices["extract"]._actions for s in a.option_strings}


def test_node_classes_are_named_as_their_node_ids() -> None:
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.GET_SCHEMA().node_id == name == cls.__name__


@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
def test_widgets_are_the_declarations_in_declaration_order(node: str) -> None:
    types = NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
    memory = list(MEMORY_OPTIONS) if node == "LoraExtractV2" else []
    required = [o for o in EXTRACT_OPTIONS if o.node and not o.optional] + memory
    optional = [o for o in EXTRACT_OPTIONS if o.node and o.optional]
    sockets = ["finetuned_model", "original_model", "finetuned_clip", "original_clip"]
    assert list(types["required"]) == [o.name for o in required]
    assert list(types["optional"]) == sockets + [o.name for o in optional]
    for o in required + optional:
        section = "optional" if o.optional else "required"
        io_type, spec = types[section][o.name]
        assert io_type == {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "choice": "COMBO",
                           "string": "STRING"}[o.kind]
        assert spec["tooltip"] == o.tooltip
        if o.name != "filename_prefix":
            assert spec["default"] == o.default, o.name
        if o.kind in ("int", "float"):
            assert (spec["min"], spec["max"], spec["step"]) == (o.min, o.max, o.step)
        if o.kind == "choice":
            assert spec["options"] == list(o.values())


def test_config_defaults_are_the_declared_ones() -> None:
    cfg = ExtractConfig()
    for o in EXTRACT_OPTIONS:
        if o.config_field is not None:
            assert getattr(cfg, o.config_field) == o.config_value(o.default), o.name
    mem = MemoryOptions()
    for o in MEMORY_OPTIONS:
        if o.name in ("vram_usage_mode", "memory_threshold", "debug_mode"):
            assert getattr(mem, o.config_field) == o.default, o.name


def test_every_flagged_option_is_a_flag_with_its_default_and_help() -> None:
    actions = _extract_parser_actions()
    for o in (*EXTRACT_OPTIONS, *MEMORY_OPTIONS):
        for flag in filter(None, (o.flag, o.off_flag)):
            assert flag in actions, flag
        if o.flag and (o.cli_kind or o.kind) != "bool":
            a = actions[o.flag]
            # A repeatable flag collects its uses (default None); no use means the default.
            default = None if o.repeatable else o.flag_default
            assert a.default == default and a.help == o.doc.replace("%", "%%"), o.name
            if o.kind == "choice":
                assert tuple(a.choices) == o.values()


@pytest.mark.parametrize("name", ["rank", "conv_rank", "text_encoder_rank", "lowrank_iters",
                                  "adaptive_param"])
def test_config_limits_are_the_widget_limits(name: str) -> None:
    o = EXTRACT[name]
    ExtractConfig(**{name: o.max}).validate()
    ExtractConfig(**{name: o.min if o.min > 0 or name == "adaptive_param" else 0}).validate()
    step = 1 if o.kind == "int" else 0.5
    with pytest.raises(ExtractionInputError, match=f"^{name} .* is out of range"):
        ExtractConfig(**{name: o.max + step}).validate()
    with pytest.raises(ExtractionInputError, match=f"^{name} .* is out of range"):
        ExtractConfig(**{name: o.min - step}).validate()


def test_a_new_rank_rule_reaches_the_node_the_cli_and_validation(monkeypatch) -> None:
    rules = dict(rank_rules.RANK_RULES)
    monkeypatch.setattr(rank_rules, "RANK_RULES", rules)
    monkeypatch.setitem(rank_rules.RULE_NEEDS, "adaptive_test", frozenset())
    rules["adaptive_test"] = lambda sigma, p, totals: 1
    monkeypatch.setattr("lora_extract.extract.options.RANK_RULES", rules)
    monkeypatch.setattr("lora_extract.extract.config.RANK_RULES", rules)
    assert lora_types()[-1] == "adaptive_test"
    spec = NODE_CLASS_MAPPINGS["LoraExtract"].INPUT_TYPES()["required"]["lora_type"][1]
    assert spec["options"][-1] == "adaptive_test"
    assert "adaptive_test" in _extract_parser_actions()["--lora-type"].choices
    ExtractConfig(lora_type="adaptive_test").validate()


def test_adding_an_option_is_one_entry() -> None:
    """A new optional entry appended to the table becomes the last input of both nodes."""
    import lora_extract.nodes.extract_inputs as inputs

    extra = dataclasses.replace(EXTRACT["bias_diff"], name="new_switch", optional=True,
                                tooltip="A new switch.", field=None)
    table = (*EXTRACT_OPTIONS, extra)
    saved = inputs.EXTRACT_OPTIONS
    try:
        inputs.EXTRACT_OPTIONS = table
        for node in ("LoraExtract", "LoraExtractV2"):
            optional = NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]
            assert list(optional)[-1] == "new_switch"
    finally:
        inputs.EXTRACT_OPTIONS = saved
