"""The UI in a real browser: every example workflow runs in headless Chromium against a real
ComfyUI server that has this pack loaded (scripts/browser_ui_check.py drives it).

Runs when ``COMFY_BROWSER_URL`` names such a server (e.g. http://127.0.0.1:8188) and
``COMFYUI_ROOT`` its checkout, with a Python that has playwright (``BROWSER_PYTHON``, default
~/browser-venv/bin/python) and a system Chromium; skipped otherwise. Checks, per workflow: it
runs, no node type is missing, no console error comes from the pack, every summary box shows its
key lines without scrolling, and no two nodes overlap, before or after the run; the chart opens
at full size and closes with Escape. ``README_IMAGES=<dir>`` also writes the README pictures.
Files the runs save in ComfyUI's loras folders are deleted afterwards.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from tests.support.paths import REPO_ROOT

PACK = REPO_ROOT
URL = os.environ.get("COMFY_BROWSER_URL")
ROOT = os.environ.get("COMFYUI_ROOT")
PYTHON = os.environ.get("BROWSER_PYTHON", os.path.expanduser("~/browser-venv/bin/python"))
CHROMIUM = [p for p in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"))
            if p and os.access(p, os.X_OK)]
WORKFLOWS = sorted(glob.glob(os.path.join(PACK, "example_workflows", "*.json")))

pytestmark = [
    pytest.mark.skipif(not (URL and ROOT), reason="COMFY_BROWSER_URL / COMFYUI_ROOT not set (no ComfyUI server)"),
    pytest.mark.skipif(not os.access(PYTHON, os.X_OK), reason=f"no browser python at {PYTHON} (playwright)"),
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium installed"),
]


def _saved_loras() -> set[str]:
    assert ROOT
    return {p for d in ("output/loras", "models/loras") for p in glob.glob(os.path.join(ROOT, d, "*.safetensors"))}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ui")
    before = _saved_loras()
    cmd = [PYTHON, os.path.join(PACK, "scripts", "browser_ui_check.py"), "--server", URL, "--out", str(out),
           "--chromium", CHROMIUM[0], *WORKFLOWS]
    if os.environ.get("README_IMAGES"):
        cmd += ["--images", os.environ["README_IMAGES"]]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    finally:
        for p in _saved_loras() - before:
            os.remove(p)
    path = out / "report.json"
    assert path.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(path.read_text())


def _by_name(report: dict) -> dict[str, dict]:
    return {w["workflow"]: w for w in report["workflows"]}


def test_every_example_workflow_ran_in_the_browser(report) -> None:
    assert sorted(_by_name(report)) == sorted(os.path.basename(w)[:-5] for w in WORKFLOWS)
    for name, w in _by_name(report).items():
        assert w["problems"] == [] and w.get("status") == "success", (name, w["problems"], w.get("status"))


def test_no_missing_node_and_no_console_error_from_the_pack(report) -> None:
    for name, w in _by_name(report).items():
        assert w["missing_nodes"] == [], name
        assert w["console_errors"] == [], (name, w["console_errors"])


def test_summary_shows_its_key_lines_without_scrolling(report) -> None:
    boxes = 0
    for name, w in _by_name(report).items():
        for n in w["nodes"]:
            s = n.get("summary")
            if s is None:
                continue
            boxes += 1
            assert s["displayed"] and s["scroll_top"] == 0, (name, n["id"])
            if n["type"] != "LoraResize":   # extraction and validation: file, size, ranks, errors, counts
                assert s["key_lines"] >= 5, (name, n["id"], s["text"])
            assert s["visible_height"] >= s["key_height"], (name, n["id"], s)
    assert boxes >= 6   # 2 extractions + 1 V2 + 2 validations + 1 resize


def test_no_two_nodes_overlap_before_or_after_the_run(report) -> None:
    for name, w in _by_name(report).items():
        assert w["overlaps_before"] == [], (name, w["overlaps_before"])
        assert w["overlaps_after"] == [], (name, w["overlaps_after"])


def test_progress_text_is_shown_once_by_the_frontend(report) -> None:
    # Frontends that show progress text in the node (widget $$node-text-preview) get no second copy
    # from the pack (web/live_status.js draws only where that widget is absent).
    for name, w in _by_name(report).items():
        if w["progress_events"] == 0:
            continue
        ours = [n for n in w["nodes"] if n["type"].startswith("Lora") and n.get("summary")]
        assert ours and all("$$node-text-preview" in n["widgets"] for n in ours), name


def test_chart_opens_full_size_and_closes(report) -> None:
    c = report["chart_full_size"]
    assert c["node"] is not None
    natural, shown = c["natural_size"]
    assert natural >= 1000 and shown == natural
    assert c["closed_by_escape"]
