"""Where the tests find the repository's files, and the benchmark and script modules they reuse.

``benchmarks/`` and ``scripts/`` are folders of standalone programs, not packages: a test that
reuses one (a GGUF writer, the soak loop, the CLI reference renderer) loads it by its path here,
so no test puts those folders on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def repo_module(relative_path: str) -> ModuleType:
    """The module at ``relative_path`` (from the repository root, e.g. ``benchmarks/soak.py``),
    imported once under its file name and reused after that."""
    name = os.path.splitext(os.path.basename(relative_path))[0]
    path = os.path.join(REPO_ROOT, relative_path)
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
