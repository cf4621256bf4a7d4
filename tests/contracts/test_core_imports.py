"""The numeric core never imports ComfyUI (it must run without it, and stay testable).

Which package may import which (the layers, and no ComfyUI module in the core's sources) is
checked statically by the import-linter contracts in pyproject.toml (``lint-imports``); this file
checks what only a run shows: importing the core and the command line loads no ComfyUI module.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import REPO_ROOT

COMFY_MODULES = {"comfy", "folder_paths", "server", "comfy_api", "comfy_extras", "nodes"}
ROOT = REPO_ROOT


def test_core_imports_no_comfyui_module() -> None:
    code = (
        "import sys\n"
        "import lora_extract.extract, lora_extract.memory, lora_extract.resize, lora_extract.validation\n"
        "import lora_extract.cli\n"
        "import lora_extract\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMFY_MODULES)!r})\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    # The stub directory must not be on the path: if the core tried to import comfy, it fails.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_root_init_loads_as_a_lone_file() -> None:
    """pytest imports the repository root's __init__.py as a plain module when the checkout's
    folder name is not an identifier (e.g. a clone named ComfyUI-LoRA-Extract)."""
    import importlib.util

    root_init = os.path.join(REPO_ROOT, "__init__.py")
    spec = importlib.util.spec_from_file_location("__init__", root_init)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web" and not hasattr(module, "NODE_CLASS_MAPPINGS")
    # As a lone file it has no nodes to give; it says so instead of failing on a relative import.
    import asyncio

    import pytest

    with pytest.raises(ImportError, match="as a package"):
        asyncio.run(module.comfy_entrypoint())


def test_no_command_line_modules_at_the_root() -> None:
    assert sorted(f for f in os.listdir(ROOT) if f.startswith("cli") and f.endswith(".py")) == []


def test_only_the_node_api_module_imports_comfy_api() -> None:
    """ComfyUI's node API is imported in one module (nodes/comfy_io.py); every other call into
    ComfyUI goes through nodes/comfy_adapter.py, which imports ComfyUI inside its functions."""
    offenders = []
    for dirpath, _dirs, files in os.walk(ROOT):
        # folder names under the root (a checkout's own path may contain "tests")
        if {"tests", ".git", "scripts", "benchmarks"} & set(os.path.relpath(dirpath, ROOT).split(os.sep)):
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                for line in open(path, encoding="utf-8"):
                    s = line.strip()
                    if s.startswith(("import ", "from ")) and s.split()[1].split(".")[0] == "comfy_api":
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == [os.path.join("nodes", "comfy_io.py")]
