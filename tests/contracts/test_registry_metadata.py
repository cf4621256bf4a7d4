"""pyproject.toml carries what the Comfy Registry and ComfyUI-Manager read ([tool.comfy] and
[project.urls]), and what it names exists in the pack."""

from __future__ import annotations

import os
import re

import tomllib

from tests.support.paths import REPO_ROOT

PACK = REPO_ROOT


def _pyproject() -> dict:
    with open(os.path.join(PACK, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_tool_comfy_section_as_the_registry_spec_asks() -> None:
    comfy = _pyproject()["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"]
    assert sorted(comfy["includes"]) == ["example_workflows/", "web/"]
    for folder in comfy["includes"]:
        assert os.path.isdir(os.path.join(PACK, folder)), folder
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    # The icon is in the repository (<= 800 x 400 px, as the spec asks). Its absolute URL is only
    # known once published; if Icon is set, it must point at that file and be no placeholder.
    from PIL import Image

    with Image.open(os.path.join(PACK, "docs", "images", "icon.png")) as im:
        assert im.width <= 800 and im.height <= 400
    if "Icon" in comfy:
        assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/docs/images/icon.png")


def test_project_metadata_the_registry_requires() -> None:
    project = _pyproject()["project"]
    # name: < 100 chars, alphanumerics, '-', '_', '.', no leading digit or special character
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    # [project.urls] is added when publishing (CONTRIBUTING.md); (tests/contracts/test_docs.py: no placeholder)
    for url in project.get("urls", {}).values():
        assert url.startswith("https://"), url
    assert project["license"] and project["description"]
    # torch comes from the user's ComfyUI: neither the project nor requirements.txt may pull it
    reqs = open(os.path.join(PACK, "requirements.txt"), encoding="utf-8").read().split()
    for dep in [*project["dependencies"], *reqs]:
        assert not re.match(r"(torch|torchvision|torchaudio)\b", dep), dep
