"""The front-end extension: every file parses, registers exactly one extension, does nothing
else at import, and its hooks do what they claim (run under node with a fake ComfyUI API)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.support.paths import REPO_ROOT

WEB = os.path.join(REPO_ROOT, "web")
JS_FILES = sorted(f for f in os.listdir(WEB) if f.endswith(".js"))
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node.js is not installed")

# Loads one extension file with a fake window.comfyAPI, records what the file touches at import,
# then exercises its hooks the way the ComfyUI frontend calls them and prints the outcome.
HARNESS = r"""
const fs = require("fs");
const vm = require("vm");
const touched = [];
const handlers = {};
const registered = [];
const widgets = { STRING(node, name) {
  const widget = { name, value: "", inputEl: { style: {} } };
  node.widgets.push(widget);
  return { widget };
} };
const graphNodes = {};
const app = {
  registerExtension(ext) { registered.push(ext); },
  graph: { getNodeById: (id) => graphNodes[id] ?? null, _nodes: [] },
};
const api = { addEventListener(type, fn) { handlers[type] = fn; } };
const comfyAPI = new Proxy({ app: { app }, api: { api }, widgets: { ComfyWidgets: widgets } }, {
  get(target, key) { touched.push(String(key)); return target[key]; },
});
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), { window: { comfyAPI }, console });
const atImport = [...touched];
const out = { atImport, names: registered.map((e) => e.name) };

(async () => {
  for (const ext of registered) {
    class NodeType {}
    NodeType.prototype.onDrawForeground = function () {};
    await ext.beforeRegisterNodeDef?.(NodeType, { name: "LoraValidate" });
    class Other {}
    await ext.beforeRegisterNodeDef?.(Other, { name: "KSampler" });
    out.hooksOtherNode = Object.keys(Other.prototype);
    const node = Object.assign(Object.create(NodeType.prototype), {
      widgets: [], size: [200, 100], comfyClass: "LoraValidate", flags: {},
      computeSize: () => [300, 200], setSize(s) { this.size = s; }, setDirtyCanvas() {},
      addWidget(type, name, value, cb) { const w = { type, name, value, cb }; this.widgets.push(w); return w; },
    });
    graphNodes[7] = node;
    app.graph._nodes.push(node);
    if (node.onExecuted) {
      const keys = ["file: a.safetensors", "size: 1.00 MiB", "ranks: 4", "error: mean 1.0%", "skipped: 0"];
      node.onExecuted({ text: [keys.join("\n") + "\n\n" + "detail\n".repeat(30)], images: [{ filename: "c.png" }] });
      const summary = node.widgets.find((w) => w.name === "summary");
      out.minHeight = summary.options.getMinHeight();
      out.maxHeight = summary.options.getMaxHeight();
      node.size = [120, 200];   // narrower: the long key lines wrap, so the box needs more rows
      out.minHeightNarrow = summary.options.getMinHeight();
      node.size = [200, 100];
      node.onExecuted({ text: ["second run"], images: [{ filename: "c.png" }] });
      out.widgets = node.widgets.map((w) => ({ name: w.name, value: w.value, serialize: w.serialize,
                                               readOnly: w.inputEl?.readOnly }));
      out.size = node.size;
    }
    await ext.setup?.();
    if (handlers.progress_text) {
      handlers.progress_text({ detail: { nodeId: "7", text: "layer 3/10: diffusion_model.x.weight" } });
      out.status = node.loraExtractStatus;
      const drawn = [];
      const ctx = { save() {}, restore() {}, fillText: (t) => drawn.push(t) };
      node.onDrawForeground(ctx);
      out.drawn = drawn;
      out.drawnAt = [];
      node.onDrawForeground({ save() {}, restore() {}, fillText: (t, x, y) => out.drawnAt.push([x, y]) });
      // Where the frontend shows progress text in the node, nothing is drawn a second time.
      node.widgets.push({ name: "$$node-text-preview", value: "layer 3/10" });
      const again = [];
      node.onDrawForeground({ save() {}, restore() {}, fillText: (t) => again.push(t) });
      out.drawnWithFrontendText = again;
      handlers.progress_text({ detail: { nodeId: "5:7", text: "layer 4/10: y" } });
      out.statusSubgraph = node.loraExtractStatus;
      handlers.executed({ detail: { node: "7" } });
      out.statusAfter = node.loraExtractStatus;
    }
  }
  console.log(JSON.stringify(out));
})();
"""


def _run(name: str, tmp_path) -> dict:
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    r = subprocess.run([NODE, str(harness), os.path.join(WEB, name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_there_are_extension_files() -> None:
    assert {"report_summary.js", "live_status.js"} <= set(JS_FILES)


@needs_node
@pytest.mark.parametrize("name", JS_FILES)
def test_js_parses(name: str) -> None:
    r = subprocess.run([NODE, "--check", os.path.join(WEB, name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", JS_FILES)
def test_one_extension_per_file_and_no_imports(name: str) -> None:
    text = open(os.path.join(WEB, name), encoding="utf-8").read()
    assert len(re.findall(r"\.registerExtension\(", text)) == 1
    # Plain modern JS through window.comfyAPI: no relative imports of frontend internals.
    assert not re.search(r"^\s*import\s", text, re.M)


@needs_node
@pytest.mark.parametrize("name", JS_FILES)
def test_registers_once_and_does_nothing_else_at_import(name: str, tmp_path) -> None:
    out = _run(name, tmp_path)
    assert out["atImport"] == ["app"] and len(out["names"]) == 1
    assert out["names"][0].startswith("lora_extract.")
    assert out["hooksOtherNode"] == []  # other nodes' classes are left alone


@needs_node
def test_summary_is_shown_read_only_and_updated(tmp_path) -> None:
    out = _run("report_summary.js", tmp_path)
    assert out["widgets"] == [
        {"name": "summary", "value": "second run", "serialize": False, "readOnly": True},
        {"name": "open chart full size", "value": None, "serialize": False}]
    # The node keeps its width (no jump over its neighbours); only computeSize may grow it.
    assert out["size"] == [300, 200]


@needs_node
def test_summary_box_is_tall_enough_for_the_key_lines(tmp_path) -> None:
    out = _run("report_summary.js", tmp_path)
    # 5 key lines of 14 px + 28 px (widget margins, padding); the full text (5 + blank + 30 + a last empty line)
    # is the most it takes.
    assert out["minHeight"] == 5 * 14 + 28
    assert out["maxHeight"] == 37 * 14 + 28
    # At 120 px the box is ~12 characters wide: "error: mean 1.0%" (16) and
    # "file: a.safetensors" (19) and "size: 1.00 MiB" (14) wrap onto two rows each.
    assert out["minHeightNarrow"] == 8 * 14 + 28


@needs_node
def test_live_status_follows_progress_text(tmp_path) -> None:
    out = _run("live_status.js", tmp_path)
    assert out["status"] == "layer 3/10: diffusion_model.x.weight"
    # A 200-px node fits 28 characters: the end of the key (the layer name) is kept.
    assert out["drawn"] == ["..." + "layer 3/10: diffusion_model.x.weight"[-25:]]
    # below the 100-px node body, clear of the title badges and the running outline
    assert out["drawnAt"] == [[6, 118]]
    assert out["drawnWithFrontendText"] == []
    assert out["statusSubgraph"] == "layer 4/10: y"
    assert out["statusAfter"] == ""


def test_every_node_has_a_help_page_naming_its_inputs_and_outputs() -> None:
    from lora_extract.nodes import NODE_CLASS_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        path = os.path.join(WEB, "docs", f"{name}.md")
        assert os.path.isfile(path), f"no help page for {name}"
        text = open(path, encoding="utf-8").read()
        inputs = [n for section in ("required", "optional") for n in cls.INPUT_TYPES().get(section, {})]
        missing = [n for n in [*inputs, *(getattr(cls, "RETURN_NAMES", None) or ())]
                   if not re.search(rf"\b{re.escape(n)}\b", text)]
        assert missing == [], f"{name}.md does not mention {missing}"
