"""The documentation stays true: links resolve, option tables match the code, the README's test
command is what CI runs, the README stays a short front door, and no page carries placeholders.

Each check here was seen to fail on a broken page (a link to a missing anchor, a default changed
in a table, a flag added to the parser, a line added to the README's test command).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.paths import REPO_ROOT as ROOT
from tests.support.paths import repo_module

make_cli_reference = repo_module("scripts/make_cli_reference.py")

README = os.path.join(ROOT, "README.md")
PAGES = sorted([README, os.path.join(ROOT, "CONTRIBUTING.md"),
                *glob.glob(os.path.join(ROOT, "docs", "*.md")),
                *glob.glob(os.path.join(ROOT, "web", "docs", "*.md"))])

# Pages the README links that are written alongside other changes; a link to them may dangle only
# while they are absent from this checkout. Remove a name once its page is in the repository.
PAGES_ADDED_SEPARATELY: set[str] = set()


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    out, fenced = set(), False
    for line in _read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(_slug(m.group(1)))
    return out


def _links(path: str) -> list[str]:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_a_short_front_door() -> None:
    lines = _read(README).splitlines()
    assert len(lines) <= 250, len(lines)
    for heading in ("## Install", "## Quick start on a fresh machine", "## Your first extraction in ComfyUI",
                    "## Your first extraction from the command line", "## The nodes", "## Read more"):
        assert heading in lines, heading


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(page: str) -> None:
    checked = 0
    for link in _links(page):
        if re.match(r"[a-z]+:", link):          # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if not os.path.exists(path):
            assert rel in PAGES_ADDED_SEPARATELY, f"{os.path.relpath(page, ROOT)}: link to missing {link}"
            continue
        if anchor:
            assert anchor in _anchors(path), f"{os.path.relpath(page, ROOT)}: no heading for #{anchor} in {rel}"
        checked += 1
    if page == README:
        assert checked >= 15


def test_every_node_links_its_help_page_from_the_readme() -> None:
    readme = _read(README)
    for name in NODE_CLASS_MAPPINGS:
        assert f"(web/docs/{name}.md)" in readme, name
        assert os.path.isfile(os.path.join(ROOT, "web", "docs", f"{name}.md")), name


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    quick = _read(README).split("## Quick start on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = _code_blocks(quick)
    assert len(blocks) == 2, "the quick start has two commands: install + demo, install + tests"
    demo, tests = (b.strip() for b in blocks)
    assert "\n" not in demo and demo.endswith("lora-extract demo")
    assert "\n" not in tests and tests.endswith("python -m pytest tests")
    ci = [line.strip() for line in _read(os.path.join(ROOT, ".ci", "run")).splitlines()]
    assert tests in ci, f".ci/run must run the README's test command verbatim: {tests}"


def test_cli_flag_tables_match_the_parser() -> None:
    page = _read(make_cli_reference.PAGE)
    assert make_cli_reference.render(page) == page, \
        "docs/command-line.md differs from the parser: run python scripts/make_cli_reference.py"
    # and the page names every subcommand
    for command in ("extract", "validate", "resize", "demo"):
        assert f"### `lora-extract {command}`" in page


# --- node input tables against the node definitions ---------------------------------------------

def _visible(cls) -> dict[str, tuple]:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _table(text: str, header: str) -> dict[str, str]:
    """The rows of the markdown table under `header`: input name -> default cell ('' when none)."""
    start = text.index(header)
    rows = text[start:].split("\n\n", 1)[0].splitlines()
    has_default = "| default |" in rows[0]
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        m = re.fullmatch(r"\**`?(\w+)`?\**(?: \(opt\.\))?", cells[0])
        if m:
            out[m.group(1)] = cells[1] if has_default else ""
        else:   # "`a`, `b` (opt.)": several inputs in one row
            for name in re.findall(r"`(\w+)`", cells[0]):
                out[name] = ""
    return out


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _check_defaults(node: str, table: dict[str, str], declared: dict[str, tuple]) -> int:
    checked = 0
    for name, cell in table.items():
        spec = declared[name]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if not cell or "default" not in opts:
            continue
        text = cell.split(" (")[0].strip("`").replace("true", "on").replace("false", "off")
        assert text == _shown(opts["default"]), (node, name, cell, opts["default"])
        checked += 1
    return checked


@pytest.mark.parametrize("node", sorted(NODE_CLASS_MAPPINGS))
def test_help_page_input_table_matches_the_node(node: str) -> None:
    cls = NODE_CLASS_MAPPINGS[node]
    declared = _visible(cls)
    text = _read(os.path.join(ROOT, "web", "docs", f"{node}.md"))
    header = next(h for h in ("| input | default | what it does |", "| input | what it is |") if h in text)
    table = _table(text, header)
    assert set(table) <= set(declared), (node, set(table) - set(declared))
    if node == "LoraExtractV2":
        # the page lists V2's own inputs and refers to LoRA Extract's for the rest
        assert "LoRA Extract" in text
        base = set(_visible(NODE_CLASS_MAPPINGS["LoraExtract"]))
        assert set(declared) - base <= set(table), (node, set(declared) - base - set(table))
    else:
        assert set(table) == set(declared), (node, set(declared) ^ set(table))
    _check_defaults(node, table, declared)


def test_nodes_page_extract_table_matches_the_node() -> None:
    declared = _visible(NODE_CLASS_MAPPINGS["LoraExtract"])
    table = _table(_read(os.path.join(ROOT, "docs", "nodes.md")), "| input | default | meaning |")
    assert set(table) == set(declared), set(table) ^ set(declared)
    assert _check_defaults("LoraExtract", table, declared) >= 12


# --- nothing presented as a result that is not one, nothing outside the repository ----------------

def _tracked_text_files() -> list[str]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    keep = (".py", ".md", ".sh", ".toml", ".txt", ".json", ".js", ".cfg", ".yml", ".yaml")
    return [n for n in names if n.endswith(keep) or n == ".ci/run"]


# (pattern, what it is, only in documentation pages); each pattern is split so this file has none
FORBIDDEN = [
    (re.compile(r"\.\./" + "shared/|(?<![\\w.])shared/(notes|comfyui)"), "a path outside the repository", False),
    (re.compile(r"\bOW" + r"NER\b"), "a placeholder", False),
    (re.compile(r"\bissue " + r"\d+", re.I), "a reference to a work log outside the repository", False),
    (re.compile(r"\b(an earlier|this|that) " + r"session\b"), "how the project is built", False),
    (re.compile(r"\bpen" + r"ding\b|\bTO" + r"DO\b|\bTB" + r"D\b", re.I), "a result not there yet", True),
]


def test_no_placeholders_pending_rows_or_paths_outside_the_repository() -> None:
    me = os.path.relpath(__file__, ROOT)
    found = []
    for name in _tracked_text_files():
        if not name or name == me or not os.path.isfile(os.path.join(ROOT, name)):
            continue
        for n, line in enumerate(_read(os.path.join(ROOT, name)).splitlines(), 1):
            for pattern, what, docs_only in FORBIDDEN:
                if pattern.search(line) and (name.endswith(".md") or not docs_only):
                    found.append(f"{name}:{n}: {what}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
