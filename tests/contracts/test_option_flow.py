"""One option, followed from a node input to the decomposition, never comes back to a module it
has left: the call path reads top-down through the layers (nodes -> run set-up -> layer loop ->
one layer -> decomposition), as ``pyproject.toml``'s import contracts lay them out."""

from __future__ import annotations

import inspect
import threading

import pytest
from execution import run_node

from lora_extract.extract import decompose, exact_svd
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import patched_pair

PACK = "lora_extract."


def _pack_modules_on_the_stack() -> list[str]:
    """The pack's modules on the current call stack, outermost first, consecutive repeats once."""
    names: list[str] = []
    for frame in reversed(inspect.stack()[1:]):
        mod = frame.frame.f_globals.get("__name__", "")
        if mod.startswith(PACK) and (not names or names[-1] != mod):
            names.append(mod)
    return names


@pytest.mark.parametrize("node,option,value,hook", [
    ("LoraExtract", "lowrank_iters", 3, "randomized_svd"),
    ("LoraExtract", "algorithm", "svd_linalg", "exact_svd"),
    ("LoraExtractV2", "lowrank_iters", 3, "randomized_svd"),
])
def test_option_reaches_the_decomposition_without_returning(comfy_dirs, monkeypatch, node: str,
                                                            option: str, value, hook: str) -> None:
    _base, _tuned, patcher, tuned_patcher = patched_pair(width=128, seed=5)
    paths: list[list[str]] = []
    real = getattr(decompose, hook, None) or getattr(exact_svd, hook)

    def spy(*args, **kwargs):
        on_main = threading.current_thread() is threading.main_thread()
        paths.append((on_main, _pack_modules_on_the_stack()))
        return real(*args, **kwargs)

    for mod in ("lora_extract.extract.layer", "lora_extract.extract.decompose", "lora_extract.extract.exact_svd",
                "lora_extract.extract.batched", "lora_extract.extract.dora"):
        m = __import__(mod, fromlist=["x"])
        if hasattr(m, hook):
            monkeypatch.setattr(m, hook, spy)
    inputs = dict(filename_prefix="loras/flow", rank=8, lora_type="standard",
                  algorithm="svd_lowrank", lowrank_iters=7, output_dtype="fp32", bias_diff=True,
                  adaptive_param=0.15, clamp_quantile=False,
                  finetuned_model=tuned_patcher, original_model=patcher)
    inputs[option] = value
    run_node(NODE_CLASS_MAPPINGS[node], inputs)
    assert paths, f"{hook} was never called"
    for on_main, path in paths:
        # A layer decomposed in a worker thread (V2's parallel layers) has the thread's entry
        # at the bottom of its stack, not the node.
        if on_main:
            assert path[0].startswith(PACK + "nodes."), path
        assert path[-1] in (PACK + "extract.layer", PACK + "extract.batched"), path
        revisited = [m for i, m in enumerate(path) if m in path[:i]]
        assert not revisited, f"the call path comes back to {revisited}: {' -> '.join(path)}"
