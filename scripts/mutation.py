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
    python scripts/mutation.py --all --sample 8    # 8 random mutants per chunk (seeded)
    python scripts/mutation.py CHUNK --ids 12,40   # given mutants again (survivors, after new tests)
    mutmut results / mutmut show ID                 # survivors of the last runs (.mutmut-cache)

A summary line per chunk (killed / survived / timed out / suspicious) is appended to
``benchmarks/out/mutation.txt``. Survivors are either killed by a new test or listed as
equivalent, with the reason, in CONTRIBUTING.md ("Mutation testing").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider"
# mutmut from the same environment, whether or not it is activated
MUTMUT = os.path.join(os.path.dirname(sys.executable), "mutmut")

UO, MR = "tests/contracts/test_user_options.py", "tests/memory/test_runtime.py"
# name: (files to mutate, fast tests that cover them)
CHUNKS: dict[str, tuple[list[str], list[str]]] = {
    "extract-config": (["extract/config.py", "extract/keys/lora_keys.py"],
                       ["tests/contracts/test_user_options.py", "tests/extract/test_pipeline.py", "tests/cli/test_bad_model_files.py",
                        "tests/extract/test_config_errors.py"]),
    "extract-layer": (["extract/layer.py", "extract/rank_rules.py"],
                      ["tests/extract/test_layer_extraction.py", "tests/extract/test_rank_rules.py", "tests/extract/test_clamp.py",
                       "tests/extract/test_edges.py",
                       f"{UO}::test_lowrank_iters_buys_accuracy"]),
    "extract-decompose": (["extract/decompose.py", "extract/exact_svd.py", "extract/power_stop.py", "extract/partial_eigh.py",
                           "extract/norms.py"],
                          ["tests/extract/test_partial_eigh.py", "tests/extract/test_randomized_accuracy.py",
                           "tests/contracts/test_float64_norms.py", "tests/contracts/test_gpu_paths_emulated.py"]),
    "extract-pipeline": (["extract/pipeline.py", "extract/pair_output.py", "extract/result.py"],
                         ["tests/extract/test_pipeline.py", "tests/contracts/test_user_options.py", "tests/cli/test_bad_model_files.py",
                          "tests/nodes/test_text_encoders.py", "tests/extract/keys/test_diffusers_keys.py",
                          "tests/extract/test_faults_oom.py", "tests/extract/budget/test_size_target.py",
                          "tests/nodes/test_load_complete_node.py", "tests/extract/test_edges.py"]),
    "memory-rolling-cache": (["memory/rolling.py", "memory/cache.py", "memory/buffers.py"],
                             ["tests/memory/test_rolling.py",
                              f"{UO}::test_rolling_window_bounds_layers_held_while_workers_are_busy",
                              f"{UO}::test_resident_cache_misses_after_add_patches",
                              f"{MR}::test_pool_reuses_buffers_and_bounds_memory",
                              f"{MR}::test_pool_never_waits_on_nothing",
                              f"{MR}::test_an_oversized_layer_waits_while_reused_buffers_are_out",
                              f"{MR}::test_resident_blocks_are_not_read_again"]),
    "memory-planner": (["memory/planner.py"],
                       ["tests/memory/test_planning.py", "tests/memory/test_runtime.py"]),
    "resize-merge": (["resize/merge.py", "resize/recipe.py"],
                     ["tests/resize/test_pipeline.py", "tests/resize/test_bad_input.py",
                      "tests/resize/test_merge_convert.py", "tests/nodes/test_merge_node.py",
                      "tests/nodes/test_resize_node.py::test_node_with_model_input_and_merge_saved_to_loras"]),
    "resize-scoring": (["resize/scoring.py"],
                       ["tests/resize/test_scoring.py", "tests/resize/test_pipeline.py"]),
    "nodes": (["nodes/extract_node.py", "nodes/extract_v2_node.py", "nodes/extract_inputs.py",
               "nodes/comfy_adapter.py"],
              ["tests/nodes/test_signatures.py", "tests/contracts/test_user_options.py",
               "tests/nodes/test_extract_node.py", "tests/nodes/test_extract_v2_node.py",
               # comfy_adapter's weight reading, text-encoder names and Load LoRA (complete)
               "tests/nodes/test_comfy_model_source.py", "tests/nodes/test_text_encoders.py",
               "tests/nodes/test_load_complete_node.py", "tests/validation/test_node_and_cli.py"]),
    "validation": (["validation/report.py", "validation/validate.py"],
                   ["tests/validation/test_validate.py", "tests/validation/test_summary_text.py",
                    f"{UO}::test_max_error_passes_a_complete_lora",
                    f"{UO}::test_max_error_fails_on_an_uncovered_layer",
                    f"{UO}::test_max_error_fails_on_an_unmatched_key",
                    f"{UO}::test_max_error_fails_on_an_unmergeable_patch",
                    f"{UO}::test_validate_node_sends_progress_text_to_its_node"]),
}


def _db():
    import sqlite3

    return sqlite3.connect(os.path.join(ROOT, ".mutmut-cache"))


def _mutants(files: list[str]) -> list[tuple[int, str]]:
    """(id, status) of every mutant of these files in mutmut's cache."""
    marks = ",".join("?" * len(files))
    with _db() as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='Mutant'").fetchone():
            return []             # a fresh checkout: mutmut has not created its cache yet
        return db.execute(
            "SELECT m.id, m.status FROM Mutant m JOIN Line l ON m.line = l.id JOIN SourceFile s "
            f"ON l.sourcefile = s.id WHERE s.filename IN ({marks}) ORDER BY m.id", files).fetchall()


def run_chunk(name: str, sample: int, seed: int, ids_wanted: list[int] | None = None) -> str:
    """Mutate the chunk's files; test every mutant, a seeded random ``sample`` of them, or the
    mutants ``ids_wanted`` (e.g. earlier survivors, after new tests).

    mutmut lists the mutants first with a no-op runner (every one then reads 'survived'); the
    ones not chosen are set back to 'untested', so a 'survived' in the cache is a real one; the
    chosen ones are reset and tested one by one with the real tests.
    """
    import random

    files, tests = CHUNKS[name]
    runner = f"{PYTEST} {' '.join(tests)}"
    t0 = time.time()
    base = [MUTMUT, "run", "--paths-to-mutate", ",".join(files), "--tests-dir", "tests",
            "--no-progress", "--simple-output"]
    before = dict(_mutants(files))
    subprocess.run([*base, "--runner", "true"], cwd=ROOT, check=False, capture_output=True)
    ids = [i for i, _ in _mutants(files)]
    if ids_wanted:
        chosen = sorted(i for i in ids_wanted if i in set(ids))
    else:
        chosen = sorted(random.Random(seed).sample(ids, min(sample, len(ids)))) if sample else ids
    with _db() as db:
        # What the no-op listing marked 'survived' was never tested: back to its earlier status.
        db.executemany("UPDATE Mutant SET status=? WHERE id=?",
                       [(before.get(i, "untested"), i) for i in ids if i not in chosen])
        # The no-op baseline took ~0 s; give each mutant's tests a 5-minute limit (10x this).
        db.execute("UPDATE MiscData SET value='30' WHERE key='baseline_time_elapsed'")
        db.executemany("UPDATE Mutant SET status='untested', tested_against_hash='' WHERE id=?",
                       [(i,) for i in chosen])
    for i in chosen:
        subprocess.run([*base, "--runner", runner, str(i)], cwd=ROOT, check=False, capture_output=True)
    status = dict(_mutants(files))
    outcome: dict[str, list[int]] = {}
    for i in chosen:
        outcome.setdefault(status[i], []).append(i)
    # mutmut's "suspicious" is a kill that took longer than its baseline (a loaded machine).
    killed = len(outcome.get("ok_killed", [])) + len(outcome.get("ok_suspicious", []))
    line = (f"{time.strftime('%Y-%m-%d %H:%M')} {name}: {killed}/{len(chosen)} killed "
            f"({len(ids)} mutants, {'chosen ids' if ids_wanted else 'sample' if sample else 'all'}), "
            f"{ {k: v for k, v in outcome.items() if k not in ('ok_killed', 'ok_suspicious')} } in {time.time() - t0:.0f} s")
    os.makedirs(os.path.join(ROOT, "benchmarks", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "out", "mutation.txt"), "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chunks", nargs="*")
    p.add_argument("--all", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--sample", type=int, default=0, help="test N random mutants per chunk (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="comma-separated mutant ids to test (e.g. earlier survivors, after new tests)")
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
        print(run_chunk(n, a.sample, a.seed, a.ids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
