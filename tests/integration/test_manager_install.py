"""Install the pack the way ComfyUI-Manager does, into a fresh copy of a ComfyUI venv, and start
ComfyUI from it: torch and torchvision stay as they were, and every node is listed.

What the Manager does for a git install: ``git clone <repo> custom_nodes/<name>``, then
``python -m pip install -r requirements.txt`` with ComfyUI's own interpreter (and ``install.py``,
which this pack does not have). Here the clone comes from this checkout's committed HEAD, the
venv is a hard-link copy of ``COMFY_VENV`` (default ~/comfyvenv: pip replaces files, it does not
write into them, so the original is never changed) and ComfyUI runs with ``--base-directory`` on
a temporary root, so its own custom_nodes, models and output are not touched.

Runs when ``COMFYUI_ROOT`` points at a ComfyUI checkout; skipped otherwise. The server listens on
``COMFY_INSTALL_PORT`` (default 8195), which must be free.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.support.paths import REPO_ROOT

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV", os.path.expanduser("~/comfyvenv"))
PORT = int(os.environ.get("COMFY_INSTALL_PORT", "8195"))
PACK = REPO_ROOT
PACK_DIR_NAME = "ComfyUI-LoRA-Extract"

pytestmark = [
    pytest.mark.skipif(not ROOT, reason="COMFYUI_ROOT is not set (no real ComfyUI here)"),
    pytest.mark.slow,
]

# Prints {dist: [version, {relative file: [size, mtime_ns]}]} for torch and torchvision.
SNAPSHOT = r"""
import importlib.metadata as md, json, os
out = {}
for name in ("torch", "torchvision"):
    d = md.distribution(name)
    files = {}
    for f in d.files or []:
        p = d.locate_file(f)
        if os.path.isfile(p):
            st = os.stat(p)
            files[str(f)] = [st.st_size, st.st_mtime_ns]
    out[name] = [d.version, str(d.locate_file("")), files]
print(json.dumps(out))
"""


def _snapshot(python: str) -> dict:
    r = subprocess.run([python, "-c", SNAPSHOT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _get(url: str, timeout: float = 30) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_manager_style_install_keeps_torch_and_lists_every_node(tmp_path) -> None:
    assert ROOT
    if not os.path.isfile(os.path.join(VENV, "bin", "python")):
        pytest.skip(f"no ComfyUI venv at {VENV}")
    if not _port_free(PORT):
        pytest.skip(f"port {PORT} is busy (set COMFY_INSTALL_PORT)")
    venv = tmp_path / "venv"
    base = tmp_path / "comfy_base"
    subprocess.run(["cp", "-al", VENV, str(venv)], check=True, timeout=600)
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                          text=True, check=True).stdout.strip() == str(venv)
    before = _snapshot(python)

    # 1. git clone into custom_nodes (the committed pack, as a user gets it)
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", PACK, str(nodes_dir / PACK_DIR_NAME)], check=True, timeout=300)
    assert not (nodes_dir / PACK_DIR_NAME / "install.py").exists()
    # 2. pip install -r requirements.txt with ComfyUI's interpreter
    pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-r",
                          str(nodes_dir / PACK_DIR_NAME / "requirements.txt")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    after = _snapshot(python)
    for name in ("torch", "torchvision"):
        assert after[name][0] == before[name][0], (name, before[name][0], after[name][0])
        assert after[name][1] == before[name][1], name   # still the venv's own copy
        assert after[name][2] == before[name][2], f"{name}: files changed by the install"

    # 3. ComfyUI from the copied venv on the temporary base directory: every node is listed
    from lora_extract.nodes import NODE_CLASS_MAPPINGS

    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [python, os.path.join(ROOT, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(PORT),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        info = None
        while time.time() < deadline and server.poll() is None:
            try:
                info = _get(f"http://127.0.0.1:{PORT}/object_info")
                break
            except OSError:
                time.sleep(1)
        log.flush()
        text = open(tmp_path / "server.log", encoding="utf-8", errors="replace").read()
        assert isinstance(info, dict), f"server did not answer:\n{text[-3000:]}"
        missing = [n for n in NODE_CLASS_MAPPINGS if n not in info]
        assert missing == [], f"nodes not listed: {missing}\n{text[-3000:]}"
        for n in NODE_CLASS_MAPPINGS:
            assert info[n]["python_module"] == f"custom_nodes.{PACK_DIR_NAME}", info[n]["python_module"]
        # (ComfyUI's own optional nodes may fail to import in a venv without e.g. torchaudio)
        assert not [ln for ln in text.splitlines() if "IMPORT FAILED" in ln and PACK_DIR_NAME in ln], text[-3000:]
        # the front-end files are served from the clone
        exts = _get(f"http://127.0.0.1:{PORT}/extensions")
        assert f"/extensions/{PACK_DIR_NAME}/report_summary.js" in exts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
