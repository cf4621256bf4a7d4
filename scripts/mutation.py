"""Mutation testing in chunks that fit a 2-core machine (a habit for developers, not CI).

Each chunk mutates a few files of one folder (extract/, memory/, resize/, nodes/, validation/)
with mutmut and runs only the fast tests that exercise them, stopping at the first failure.
mutmut 2 mutates the files in place (and restores them), which suits this repository's
layout: the repository root *is* the ``lora_extract`` package (pip's editable install points
at it), so a mutated copy elsewhere, as mutmut 3 makes, would not be the code the tests import.
Do not edit the checkout while a chunk runs.

    pip install -e .[mutation]
    python scripts/mutation.py --list              # the chunks
    python scripts/mutation.py extract-config      # one chunk (several: space-separated)
    python scripts/mutation.py --all               # every chunk (hours on 2 cores)
    mutmut results / mutmut show ID                 # survivors of the last runs (.mutmut-cache)

A summary line per chunk (killed / survived / timed out / suspicious) is appended to
``benchmarks/out/mutation.txt``. Survivors are either killed by a new test or listed as
equivalent, with the reason, in the README's testing section.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = "python -m pytest -x -q -p no:cacheprovider"

# name: (files to mutate, fast tests that cover them)
CHUNKS: dict[str, tuple[list[str], list[str]]] = {
    "extract-config": (["extract/config.py", "extract/keys.py"],
                       ["tests/test_user_options.py", "tests/test_pipeline.py", "tests/test_bad_input.py"]),
    "extract-layer": (["extract/layer.py", "extract/rank_rules.py"],
                      ["tests/test_layer_extraction.py", "tests/test_rank_rules.py",
                       "tests/test_user_options.py::test_lowrank_iters_buys_accuracy"]),
    "extract-pipeline": (["extract/pipeline.py"],
                         ["tests/test_pipeline.py", "tests/test_user_options.py", "tests/test_bad_input.py"]),
    "memory-rolling-cache": (["memory/rolling.py", "memory/cache.py", "memory/buffers.py"],
                             ["tests/test_rolling.py", "tests/test_memory_runtime.py",
                              "tests/test_user_options.py::test_rolling_window_bounds_layers_held_while_workers_are_busy",
                              "tests/test_user_options.py::test_resident_cache_misses_after_add_patches"]),
    "memory-planner": (["memory/planner.py"],
                       ["tests/test_memory_planning.py", "tests/test_memory_runtime.py"]),
    "resize-merge": (["resize/merge.py", "resize/recipe.py"],
                     ["tests/test_resize_pipeline.py", "tests/test_resize_node.py",
                      "tests/test_bad_input_resize.py", "tests/test_resize_scoring.py"]),
    "resize-scoring": (["resize/scoring.py"],
                       ["tests/test_resize_scoring.py", "tests/test_resize_pipeline.py"]),
    "nodes": (["nodes/extract_node.py", "nodes/extract_v2_node.py", "nodes/extract_inputs.py",
               "nodes/comfy_adapter.py"],
              ["tests/test_user_options.py", "tests/test_node_extract.py", "tests/test_v2_node.py",
               "tests/test_comfy_model_source.py", "tests/test_bad_input_node.py"]),
    "validation": (["validation/report.py", "validation/validate.py"],
                   ["tests/test_validate.py", "tests/test_validate_node_cli.py",
                    "tests/test_user_options.py"]),
}


def run_chunk(name: str) -> str:
    files, tests = CHUNKS[name]
    runner = f"{PYTEST} {' '.join(tests)}"
    t0 = time.time()
    cmd = ["mutmut", "run", "--paths-to-mutate", ",".join(files), "--tests-dir", "tests",
           "--runner", runner, "--no-progress", "--simple-output"]
    subprocess.run(cmd, cwd=ROOT, check=False)
    res = subprocess.run(["mutmut", "results"], cwd=ROOT, capture_output=True, text=True, check=False)
    survivors = _survivors(res.stdout, files)
    counts = _counts(files)
    line = (f"{time.strftime('%Y-%m-%d %H:%M')} {name}: {counts} in {time.time() - t0:.0f} s; "
            f"survivors {survivors}")
    os.makedirs(os.path.join(ROOT, "benchmarks", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "out", "mutation.txt"), "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return line


def _survivors(results: str, files: list[str]) -> dict[str, str]:
    """Mutant ids per file from ``mutmut results`` (section 'Survived'), for these files."""
    out: dict[str, str] = {}
    section = None
    current = None
    for line in results.splitlines():
        if line.startswith(("Survived", "Timed out", "Suspicious", "Untested", "Skipped", "Killed")):
            section = line.split()[0]
        m = re.match(r"---- (.+) \(\d+\) ----", line)
        if m:
            current = m.group(1)
        elif section == "Survived" and current in files and line.strip():
            out[current] = (out.get(current, "") + " " + line.strip()).strip()
    return out


def _counts(files: list[str]) -> dict[str, int]:
    """Mutant outcomes for these files, from mutmut's cache."""
    import sqlite3

    db = sqlite3.connect(os.path.join(ROOT, ".mutmut-cache"))
    marks = ",".join("?" * len(files))
    rows = db.execute(
        "SELECT m.status, count(*) FROM Mutant m JOIN Line l ON m.line = l.id "
        f"JOIN SourceFile s ON l.sourcefile = s.id WHERE s.filename IN ({marks}) GROUP BY m.status",
        files).fetchall()
    return dict(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chunks", nargs="*")
    p.add_argument("--all", action="store_true")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        for name, (files, tests) in CHUNKS.items():
            print(f"{name}: {' '.join(files)}  <-  {len(tests)} test selections")
        return 0
    names = list(CHUNKS) if a.all else a.chunks
    unknown = [n for n in names if n not in CHUNKS]
    if unknown or not names:
        print(f"unknown or no chunk: {unknown}; use --list", file=sys.stderr)
        return 2
    for n in names:
        print(run_chunk(n), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
