"""The pack loads the way ComfyUI loads it: by path, from ``custom_nodes/``, under a module name
made from that path, with ``lora_extract`` not importable at all.

ComfyUI 0.3.64 ``nodes.load_custom_node`` (unchanged in 0.33) does, for a folder::

    sys_module_name = module_path.replace(".", "_x_")
    module_spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[sys_module_name] = module
    module_spec.loader.exec_module(module)

then registers the folder ``WEB_DIRECTORY`` names (relative to the pack) if it exists, and the
nodes: a legacy ``NODE_CLASS_MAPPINGS`` if the module has one, else (V3) it awaits
``comfy_entrypoint()``, requires a ``ComfyExtension``, awaits ``on_load()`` and
``get_node_list()``, and registers each class under its schema's ``node_id`` with the schema's
display name. An absolute ``import lora_extract...``
anywhere in the pack works under pytest (the package is pip-installed) and fails there.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys

from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
STUB = os.path.join(ROOT, "tests", "comfy_stub")

# Runs in ``python -I -S``: no site-packages .pth files (so no editable-install finder), no
# PYTHONPATH, no user site, cwd elsewhere. argv: pack folder, then extra sys.path entries (the
# child stands in for ComfyUI, which puts its folders on sys.path itself; -I ignores PYTHONPATH).
CHILD = r"""
import importlib.util, json, os, sys
module_path, *paths = sys.argv[1:]
sys.path.extend(paths)
assert importlib.util.find_spec("lora_extract") is None, "lora_extract must not be importable here"

sys_module_name = module_path.replace(".", "_x_")
module_spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
module = importlib.util.module_from_spec(module_spec)
sys.modules[sys_module_name] = module
module_spec.loader.exec_module(module)

web = None
if getattr(module, "WEB_DIRECTORY", None) is not None:
    web_dir = os.path.abspath(os.path.join(module_path, module.WEB_DIRECTORY))
    if os.path.isdir(web_dir):
        web = sorted(os.listdir(web_dir))
import asyncio, inspect
from comfy_api.latest import ComfyExtension
assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "ComfyUI would take the legacy path"
entry = module.comfy_entrypoint
extension = asyncio.run(entry()) if inspect.iscoroutinefunction(entry) else entry()
assert isinstance(extension, ComfyExtension), type(extension)
asyncio.run(extension.on_load())
node_list = asyncio.run(extension.get_node_list())
assert isinstance(node_list, list)
nodes, display = {}, {}
for cls in node_list:
    schema = cls.GET_SCHEMA()
    spec = cls.INPUT_TYPES()          # what /object_info calls when the browser opens
    nodes[schema.node_id] = {"module": cls.__module__, "function": cls.FUNCTION,
                             "callable": callable(getattr(cls, cls.FUNCTION)),
                             "required": list(spec["required"])}
    display[schema.node_id] = schema.display_name
print(json.dumps({"nodes": nodes, "display": display, "web": web,
                  "lora_extract_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "lora_extract"),
                  "module_name": sys_module_name}))
"""


def _copy_pack(dest: str) -> None:
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis",
        "build", "dist", "*.safetensors"))


def _third_party_paths() -> list[str]:
    """site-packages as plain path entries (torch, safetensors ...): their .pth files, among
    them the editable install's finder, are not run."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def test_comfyui_loads_the_pack_by_path(tmp_path) -> None:
    custom_nodes = tmp_path / "Comfy.UI" / "custom_nodes"     # a dot in the path, as on many installs
    pack = custom_nodes / "ComfyUI-LoRA-Extract"
    _copy_pack(str(pack))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, str(pack), STUB, *_third_party_paths()],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = set(NODE_CLASS_MAPPINGS)
    assert {"LoraExtract", "LoraExtractV2", "LoraResize", "LoraValidate"} <= expected
    assert set(out["nodes"]) == expected
    assert set(out["display"]) == expected
    for name, info in out["nodes"].items():
        # The classes come from the path-named package, not from an installed lora_extract.
        assert info["module"].startswith(out["module_name"] + ".nodes."), (name, info)
        assert info["callable"] and info["required"], name
    assert out["lora_extract_loaded"] == []
    assert out["web"] and any(f.endswith(".js") for f in out["web"])
