"""Every example workflow matches our nodes' current inputs (names, types, ranges, combo
values), its API twin is the same graph, and the checker itself catches broken files."""

from __future__ import annotations

import copy
import json
import os

import folder_paths
import pytest

from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.paths import REPO_ROOT
from tests.support.workflow_check import check_api, check_ui, load_definitions, ui_to_api

ROOT = REPO_ROOT
WF_DIR = os.path.join(ROOT, "example_workflows")
UI_FILES = sorted(f for f in os.listdir(WF_DIR) if f.endswith(".json"))


@pytest.fixture(scope="module")
def defs(tmp_path_factory):
    folder_paths._set_base_dir(str(tmp_path_factory.mktemp("comfy")))
    dirs = [folder_paths.get_folder_paths(f)[0] for f in ("loras", "checkpoints", "diffusion_models")]
    return load_definitions(NODE_CLASS_MAPPINGS, dirs)


def _load(*parts: str) -> dict:
    with open(os.path.join(WF_DIR, *parts), encoding="utf-8") as f:
        return json.load(f)


def _strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def test_the_documented_workflows_exist() -> None:
    expected = {"extract_then_validate.json", "extract_then_apply.json"}
    if "LoraResize" in NODE_CLASS_MAPPINGS:
        expected.add("resize_lora.json")
    if "LoraMerge" in NODE_CLASS_MAPPINGS:
        expected.add("merge_loras.json")
    if "LoraExtractV2" in NODE_CLASS_MAPPINGS:
        expected.add("extract_v2_then_validate.json")
    assert expected <= set(UI_FILES)
    assert set(UI_FILES) == set(os.listdir(os.path.join(WF_DIR, "api")))


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_matches_node_definitions(name: str, defs) -> None:
    assert check_ui(_load(name), defs) == []


@pytest.mark.parametrize("name", UI_FILES)
def test_api_twin_is_valid_and_the_same_graph(name: str, defs) -> None:
    api = _load("api", name)
    assert check_api(api, defs) == []
    assert _strip_meta(api) == _strip_meta(ui_to_api(_load(name), defs))


def test_extract_then_validate_chains_the_saved_file(defs) -> None:
    api = _load("api", "extract_then_validate.json")
    extract = next(k for k, v in api.items() if v["class_type"] == "LoraExtract")
    validate = next(v for v in api.values() if v["class_type"] == "LoraValidate")
    assert validate["inputs"]["lora_path"] == [extract, 0]


def test_checker_catches_rotten_workflows(defs) -> None:
    ui = _load("extract_then_validate.json")
    node = next(n for n in ui["nodes"] if n["type"] == "LoraExtract")
    rank_at = [w.name for w in defs["LoraExtract"].widgets].index("rank")
    type_at = [w.name for w in defs["LoraExtract"].widgets].index("lora_type")

    def broken(change) -> list[str]:
        wf = copy.deepcopy(ui)
        change(next(n for n in wf["nodes"] if n["id"] == node["id"]), wf)
        return check_ui(wf, defs)

    assert any("outside [1, 4096]" in e for e in broken(lambda n, wf: n["widgets_values"].__setitem__(rank_at, 0)))
    assert any("not one of" in e for e in broken(lambda n, wf: n["widgets_values"].__setitem__(type_at, "svd")))
    assert any("widget values" in e for e in broken(lambda n, wf: n["widgets_values"].pop()))
    assert any("unknown input" in e for e in broken(lambda n, wf: n["inputs"][0].__setitem__("name", "model")))
    # LoraExtract's MODEL and CLIP pairs are optional (either pair is enough; the node checks
    # that at run time): a required socket left empty is shown on LoraValidate's MODEL input.
    validate_id = next(n["id"] for n in ui["nodes"] if n["type"] == "LoraValidate")

    def unlink_validate_input(_n, wf) -> None:
        next(n for n in wf["nodes"] if n["id"] == validate_id)["inputs"][0]["link"] = None
    assert any("not connected" in e for e in broken(unlink_validate_input))
    assert any("type MODEL into a IMAGE" in e or "is IMAGE" in e
               for e in broken(lambda n, wf: n["inputs"][0].__setitem__("type", "IMAGE")))
    api = _load("api", "extract_then_validate.json")
    key = next(k for k, v in api.items() if v["class_type"] == "LoraExtract")
    bad = copy.deepcopy(api)
    bad[key]["inputs"]["alpha"] = -1.0
    del bad[key]["inputs"]["rank"]
    errs = check_api(bad, defs)
    assert any("alpha" in e and "outside" in e for e in errs) and any("rank missing" in e for e in errs)
