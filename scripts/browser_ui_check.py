#!/usr/bin/env python3
"""Run the example workflows in a real headless Chromium against a running ComfyUI and report
what a user sees: console errors, missing nodes, summary boxes, node overlaps, progress text.

    ~/browser-venv/bin/python scripts/browser_ui_check.py --server http://127.0.0.1:8188 \
        --out /tmp/ui-check [--images docs/images] example_workflows/*.json

Needs playwright (pip) and a system Chromium (``apt-get install chromium``); playwright's own
browser download is never used. Writes ``<out>/report.json`` (read by tests/integration/test_browser_ui.py)
and screenshots; with ``--images`` also the documentation pictures (the extract-then-validate graph after
a run, and the chart at full size), cropped and reduced to a small palette.
Exit status: 0 when every check passed, 1 otherwise (the report says which), 5 on setup errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

PACK_MARKERS = ("/extensions/ComfyUI-LoRA-Extract/", "lora_extract.")
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")

PROBE_JS = r"""
() => {
  if (window.__uic) return;
  const app = window.comfyAPI.app.app;
  window.__uic = { missing: [], progress: 0 };
  app.registerExtension({ name: "ui_check.probe",
    async afterConfigureGraph(missing) {
      window.__uic.missing = (missing ?? []).map((m) => typeof m === "string" ? m : m?.type ?? String(m));
    } });
  window.comfyAPI.api.api.addEventListener("progress_text", () => { window.__uic.progress++; });
}
"""

# Set a widget of an active node (by id and name) to a value.
SET_WIDGET_JS = r"""
([id, name, value]) => {
  const n = window.comfyAPI.app.app.graph.getNodeById(id);
  const w = n?.widgets?.find((w) => w.name === name);
  if (!w) return false;
  w.value = value; w.callback?.(value); return true;
}
"""

# Geometry of every node, and for each summary box: its visible height against the height its
# key lines (the block before the first blank line) take at the box's width.
STATE_JS = r"""
() => {
  const app = window.comfyAPI.app.app;
  const th = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  const nodes = [];
  for (const n of app.graph._nodes) {
    const entry = { id: n.id, type: n.comfyClass ?? n.type, pos: [...n.pos], size: [...n.size],
                    title_height: th, collapsed: !!n.flags?.collapsed,
                    widgets: (n.widgets ?? []).map((w) => w.name) };
    const w = n.widgets?.find((w) => w.name === "summary");
    const el = w?.inputEl;
    if (el) {
      const key = String(el.value).split("\n\n")[0];
      const probe = el.cloneNode(false);
      const cs = getComputedStyle(el);
      Object.assign(probe.style, { position: "fixed", left: "-5000px", top: "0", height: "auto",
                                   width: el.clientWidth + "px", boxSizing: "content-box",
                                   padding: cs.padding, border: "0" });
      probe.value = key;
      document.body.appendChild(probe);
      probe.style.height = "0px";
      const keyHeight = probe.scrollHeight;
      probe.remove();
      entry.summary = { key_lines: key.split("\n").length, key_height: keyHeight,
                        visible_height: el.clientHeight, content_height: el.scrollHeight,
                        scroll_top: el.scrollTop, displayed: el.getClientRects().length > 0,
                        text: String(el.value).slice(0, 600) };
    }
    nodes.push(entry);
  }
  return nodes;
}
"""

FRAME_JS = r"""
(pad) => {
  const app = window.comfyAPI.app.app;
  const c = app.canvas, r = c.canvas.getBoundingClientRect();
  const th = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th - 24);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  x0 -= pad; y0 -= pad; x1 += pad; y1 += pad;
  const s = Math.min(r.width / (x1 - x0), r.height / (y1 - y0), 1.5);
  c.ds.scale = s;
  c.ds.offset[0] = (r.width / s - (x1 - x0)) / 2 - x0;
  c.ds.offset[1] = (r.height / s - (y1 - y0)) / 2 - y0;
  c.setDirty(true, true);
  const left = r.left + (x0 + c.ds.offset[0]) * s, top = r.top + (y0 + c.ds.offset[1]) * s;
  return { x: Math.max(0, left), y: Math.max(0, top), width: Math.min((x1 - x0) * s, r.width),
           height: Math.min((y1 - y0) * s, r.height) };
}
"""


def http(method: str, url: str, body: object | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def overlaps(nodes: list[dict]) -> list[list]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    boxes = []
    for n in nodes:
        h = n["title_height"] if n["collapsed"] else n["size"][1] + n["title_height"]
        boxes.append((n["id"], n["pos"][0], n["pos"][1] - n["title_height"], n["pos"][0] + n["size"][0],
                      n["pos"][1] - n["title_height"] + h))
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            dx = min(a[3], b[3]) - max(a[1], b[1])
            dy = min(a[4], b[4]) - max(a[2], b[2])
            if dx > 0 and dy > 0:
                out.append([a[0], b[0], round(dx), round(dy)])
    return out


def small_png(src: str, dst: str, colors: int = 96) -> int:
    """Reduce a screenshot to a small palette PNG; returns its size in bytes."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > 1400:
        img = img.resize((1400, round(img.height * 1400 / img.width)), Image.LANCZOS)
    img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        dst, optimize=True)
    return os.path.getsize(dst)


def fix_file_combos(page, server: str, wf: dict) -> list:
    """Point file choices the server does not have (e.g. "my_lora") at a file it has.

    The server's lists are read now (the page's lists date from when it opened)."""
    fixed = []
    for n in wf["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in ("Note", "MarkdownNote"):
            continue
        info = http("GET", f"{server}/object_info/{n['type']}").get(n["type"], {})
        spec = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        for name, s in spec.items():
            values = s[0] if isinstance(s, list) and s and isinstance(s[0], list) else None
            current = page.evaluate(
                "([id, name]) => window.comfyAPI.app.app.graph.getNodeById(id)?.widgets?.find((w) => w.name === name)?.value",
                [n["id"], name])
            if values and current is not None and current not in values:
                pick = next((v for v in values if str(v).endswith(".safetensors")), values[0])
                page.evaluate(SET_WIDGET_JS, [n["id"], name, pick])
                fixed.append([n["id"], name, current, pick])
    return fixed


def run_workflow(page, server: str, path: str, out: str, timeout: float) -> dict:
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        wf = json.load(f)
    res: dict = {"workflow": name, "console_errors": [], "problems": []}
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null); }", wf)
    page.wait_for_timeout(800)
    types = sorted({n["type"] for n in wf["nodes"]} - {"Note", "MarkdownNote"})
    res["missing_nodes"] = sorted(set(page.evaluate("() => window.__uic.missing")) | set(page.evaluate(
        "(t) => t.filter((x) => !(x in LiteGraph.registered_node_types))", types)))
    res["fixed_combos"] = fix_file_combos(page, server, wf)
    res["overlaps_before"] = overlaps(page.evaluate(STATE_JS))
    http("POST", server + "/free", {"unload_models": True, "free_memory": True})
    progress0 = page.evaluate("() => window.__uic.progress")
    with page.expect_response(lambda r: r.url.rstrip("/").endswith("/prompt") and r.request.method == "POST",
                              timeout=60000) as ri:
        page.evaluate("async () => await window.comfyAPI.app.app.queuePrompt(0)")
    body = ri.value.json()
    pid = body.get("prompt_id") if isinstance(body, dict) else None
    if not pid:
        res["problems"].append(f"prompt rejected: {json.dumps(body)[:800]}")
        return res
    deadline = time.time() + timeout
    hist = None
    while time.time() < deadline:
        h = http("GET", f"{server}/history/{pid}")
        if h and pid in h:
            hist = h[pid]
            break
        page.wait_for_timeout(500)
    if hist is None:
        res["problems"].append(f"not finished in {timeout:.0f} s")
        return res
    res["status"] = hist["status"]["status_str"]
    res["outputs"] = hist.get("outputs", {})
    page.wait_for_timeout(2000)   # the 'executed' events reach the page; the nodes re-layout
    res["progress_events"] = page.evaluate("() => window.__uic.progress") - progress0
    res["nodes"] = page.evaluate(STATE_JS)
    res["overlaps_after"] = overlaps(res["nodes"])
    clip = page.evaluate(FRAME_JS, 30)
    # the minimap panel floats over the canvas corner: not part of the graph
    page.evaluate("() => document.querySelectorAll('[class*=minimap]').forEach((e) => { e.style.display = 'none'; })")
    page.wait_for_timeout(500)
    shot = os.path.join(out, f"{name}_after.png")
    page.screenshot(path=shot, clip=clip)
    res["screenshot"] = shot
    return res


def chart_full_size(page, out: str) -> dict:
    """Click the first 'open chart full size' button (by its callback) and capture the viewer."""
    opened = page.evaluate("""() => {
      for (const n of window.comfyAPI.app.app.graph._nodes) {
        const b = n.widgets?.find((w) => w.name === "open chart full size");
        if (b) { b.callback?.(b, window.comfyAPI.app.app.canvas, n); return n.id; }
      }
      return null; }""")
    res: dict = {"node": opened}
    if opened is None:
        return res
    img = page.locator(".lora-extract-chart-viewer img")
    img.wait_for(timeout=10000)
    page.wait_for_function("() => document.querySelector('.lora-extract-chart-viewer img')?.complete", timeout=10000)
    res["natural_size"] = page.evaluate(
        "() => { const i = document.querySelector('.lora-extract-chart-viewer img'); return [i.naturalWidth, i.width]; }")
    res["screenshot"] = os.path.join(out, "chart_full_size.png")
    img.screenshot(path=res["screenshot"])
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    res["closed_by_escape"] = page.locator(".lora-extract-chart-viewer").count() == 0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflows", nargs="+")
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", help="also write the documentation pictures (small PNGs) here")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per workflow")
    ap.add_argument("--chromium")
    a = ap.parse_args()
    server = a.server.rstrip("/")
    os.makedirs(a.out, exist_ok=True)
    exe = next((c for c in (a.chromium, os.environ.get("CHROMIUM"), *CHROMIUM) if c and os.access(c, os.X_OK)), None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed (pip install playwright)", file=sys.stderr)
        return 5
    if exe is None:
        print("no Chromium (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 5
    report: dict = {"server": server, "workflows": []}
    errors: list[dict] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda m: m.type == "error" and errors.append(
            {"text": m.text[:1000], "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: errors.append({"text": str(e)[:1000], "url": getattr(e, "stack", "") or ""}))
        page.goto(server + "/", wait_until="domcontentloaded", timeout=240000)
        page.wait_for_function("() => !!(window.comfyAPI?.app?.app?.graph && window.LiteGraph)", timeout=120000)
        page.evaluate(PROBE_JS)
        page.wait_for_timeout(2500)
        report["frontend_version"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        for _ in range(3):   # first-run dialogs (template browser)
            page.keyboard.press("Escape")
            page.evaluate("() => document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click())")
            page.wait_for_timeout(300)
        for wf in a.workflows:
            n0 = len(errors)
            res = run_workflow(page, server, wf, a.out, a.timeout)
            res["console_errors"] = [e for e in errors[n0:] if any(m in e["text"] + e["url"] for m in PACK_MARKERS)]
            if res["workflow"] == "extract_then_validate":
                report["chart_full_size"] = chart_full_size(page, a.out)
            report["workflows"].append(res)
            print(f"{res['workflow']}: status={res.get('status')} missing={res['missing_nodes']} "
                  f"overlaps={res.get('overlaps_after')} pack console errors={len(res['console_errors'])}", flush=True)
        report["other_console_errors"] = [e for e in errors if not any(m in e["text"] + e["url"] for m in PACK_MARKERS)]
        browser.close()
    if a.images:
        os.makedirs(a.images, exist_ok=True)
        pics = {}
        for res in report["workflows"]:
            if res["workflow"] == "extract_then_validate" and res.get("screenshot"):
                pics["extract_then_validate_after_run.png"] = res["screenshot"]
        if report.get("chart_full_size", {}).get("screenshot"):
            pics["chart_full_size.png"] = report["chart_full_size"]["screenshot"]
        report["images"] = {name: small_png(src, os.path.join(a.images, name)) for name, src in pics.items()}
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    ok = all(r.get("status") == "success" and not r["missing_nodes"] and not r["console_errors"]
             and not r.get("overlaps_after") for r in report["workflows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
