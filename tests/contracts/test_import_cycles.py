"""No module of the pack imports itself back through others (an import circle), so each module
can be read, tested and moved on its own. The layering between packages is an import-linter
contract (pyproject.toml); a circle inside a package is checked here, module by module."""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("lora_extract")


def circles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One import chain per direct import that the imported module leads back from."""
    found = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                found.append((module, *back))
    return found


def test_no_import_circle(graph: grimp.ImportGraph) -> None:
    assert circles(graph) == []


def test_the_run_and_the_budget_loop_do_not_import_each_other(graph: grimp.ImportGraph) -> None:
    # The two circles the run set-up and key-style modules were cut out to remove.
    assert graph.find_shortest_chain(importer="lora_extract.extract.budget.passes",
                                     imported="lora_extract.extract.pipeline") is None
    for keys in ("lora_extract.extract.keys.lora_keys", "lora_extract.extract.keys.te_keys",
                 "lora_extract.extract.keys.diffusers_keys"):
        assert graph.find_shortest_chain(importer=keys, imported="lora_extract.extract.config") is None


def test_the_plain_sources_and_the_memory_limits_sit_below_their_users(
        graph: grimp.ImportGraph) -> None:
    # The last two circles: the format readers build on the plain sources (the path dispatcher
    # lives with the formats), and the option declarations and the planner share the modes.
    assert graph.find_shortest_chain(importer="lora_extract.extract.sources",
                                     imported="lora_extract.extract.formats.dispatch") is None
    assert graph.find_shortest_chain(importer="lora_extract.memory.options",
                                     imported="lora_extract.memory.planner") is None


def test_a_new_circle_is_caught() -> None:
    graph = grimp.build_graph("lora_extract")   # its own: this test adds an import to it
    graph.add_import(importer="lora_extract.extract.keys.lora_keys",
                     imported="lora_extract.extract.config")
    assert any("lora_extract.extract.keys.lora_keys" in c for c in circles(graph))
