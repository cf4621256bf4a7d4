"""Many V1 and V2 runs in a row in one real ComfyUI server, under CPU load (scripts/server_soak.py).

Runs when ``COMFYUI_ROOT`` points at a ComfyUI checkout whose server (``COMFY_URL``, default
http://127.0.0.1:8188) runs this pack and has the tiny SD1.5 pair in ``models/diffusion_models``;
skipped otherwise. ``LORA_EXTRACT_SOAK_RUNS`` runs (default 10; the release check uses 50),
every ``vram_usage_mode`` with batch sizes 1 and 8, one background matrix-product process:
every run finishes and writes V1's file. ``COMFY_PID`` (the server's process id) adds the
server's resident memory: it must not grow by more than a quarter from the first run to the last.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.paths import repo_module

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="COMFYUI_ROOT is not set (no real ComfyUI here)")



def test_runs_in_a_row_finish_with_v1_files_and_flat_memory(tmp_path) -> None:
    server_soak = repo_module("scripts/server_soak.py")

    url = os.environ.get("COMFY_URL", "http://127.0.0.1:8188")
    try:
        server_soak.call(url, "/system_stats", timeout=5)
    except OSError:
        pytest.skip(f"no ComfyUI server answering at {url}")
    if not os.path.exists(os.path.join(ROOT, "models", "diffusion_models",
                                       "tiny_sd15_base.safetensors")):
        pytest.skip("tiny_sd15 models not generated")
    out = tmp_path / "soak.json"
    args = ["--server", url, "--comfy-root", ROOT, "--json", str(out), "--load", "1",
            "--runs", os.environ.get("LORA_EXTRACT_SOAK_RUNS", "10")]
    if os.environ.get("COMFY_PID"):
        args += ["--pid", os.environ["COMFY_PID"]]
    assert server_soak.main(args) == 0
    rows = json.loads(out.read_text())
    assert all(r["status"] == "success" and r["mismatch"] is None for r in rows)
    rss = [r["rss_mib"] for r in rows if r["rss_mib"] is not None]
    if len(rss) > 1:
        assert rss[-1] < 1.25 * rss[0], rss


@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
def test_cancel_on_the_real_server_stops_within_two_seconds_and_writes_nothing(node: str) -> None:
    import time

    server_soak = repo_module("scripts/server_soak.py")

    url = os.environ.get("COMFY_URL", "http://127.0.0.1:8188")
    try:
        server_soak.call(url, "/system_stats", timeout=5)
    except OSError:
        pytest.skip(f"no ComfyUI server answering at {url}")
    tag = f"cancel_{node}_{int(time.time() * 1000)}"
    run = ({"node": node} if node == "LoraExtract" else
           {"node": node, "vram_usage_mode": "maximum", "batch_size": 8})
    flow = server_soak.workflow("tiny_sd15", f"{tag}/run", run)
    flow["3"]["inputs"]["rank"] = 64          # slow enough to be cancelled half way
    pid = server_soak.call(url, "/prompt", {"prompt": flow})["prompt_id"]
    # Cancel once the node runs (its model loaders are done in well under a second here).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = server_soak.call(url, "/queue")
        if any(item[1] == pid for item in queue.get("queue_running", [])):
            break
        time.sleep(0.05)
    time.sleep(1.5)
    pressed = time.monotonic()
    server_soak.call(url, "/interrupt", {})
    while time.monotonic() < pressed + 30:
        hist = server_soak.call(url, f"/history/{pid}")
        if hist and pid in hist:
            break
        time.sleep(0.05)
    took = time.monotonic() - pressed
    status = hist[pid]["status"]
    kinds = [m[0] for m in status.get("messages", [])]
    if status["status_str"] == "success":
        pytest.skip(f"the run finished in under 1.5 s here; nothing to cancel ({kinds})")
    assert "execution_interrupted" in kinds, status
    assert took < 2.0, f"stopped {took:.2f} s after Cancel"
    assert not os.path.exists(os.path.join(ROOT, "output", tag)) or not os.listdir(
        os.path.join(ROOT, "output", tag))
