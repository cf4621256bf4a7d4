"""``lora-extract extract --target-size`` and ``--dry-run``."""

from __future__ import annotations

import json
import os

import pytest

from lora_extract.cli import main
from lora_extract.extract.synthetic import demo_layers, write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("cli_size")), demo_layers(32), seed=7)


def test_dry_run_prints_the_curve_and_writes_nothing(pair, tmp_path, capsys) -> None:
    before = sorted(os.listdir(os.path.dirname(pair[0])))
    assert main(["extract", *pair, "--dry-run", "--rank", "16", "--target-size", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert "error against size" in out and "no file written" in out
    # nothing is written, so no row claims to be "this file"
    assert "<- this file" not in out and "<- what --target-size would give (not written)" in out
    assert "size budget: 0.010 MiB" in out
    assert 5 <= sum(1 for r in rows if r.strip()[0].isdigit()) <= 11
    assert sorted(os.listdir(os.path.dirname(pair[0]))) == before


def test_target_size_writes_a_file_within_the_budget(pair, tmp_path, capsys) -> None:
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    assert main(["extract", *pair, "-o", str(out), "--rank", "16", "--target-size", "0.01",
                 "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    budget = report["budget"]
    assert budget["used_bytes"] <= budget["budget_bytes"] == int(0.01 * 2**20)
    assert os.path.getsize(out) == report["summary"]["file_bytes"]
    assert report["tensor_bytes"] == budget["used_bytes"]
    assert report["size_curve"]["chosen"]["tensor_bytes"] == budget["used_bytes"]


@pytest.mark.parametrize("args,needle", [
    (["--target-size", "-1"], "--target-size -1.0 is not a size"),
    (["--target-size", "nan"], "--target-size nan is not a size"),
    (["--target-size", "1e9"], "is not a size"),
    (["--target-size", "4", "--lora-type", "full"], "--lora-type 'full'"),
    (["--target-size", "0.0001"], "smaller than the smallest possible file"),
])
def test_bad_budgets_exit_2_without_file(pair, tmp_path, capsys, args, needle) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["extract", *pair, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_no_output_without_dry_run_is_an_error(pair, capsys) -> None:
    assert main(["extract", *pair]) == 2
    assert "pass -o" in capsys.readouterr().err
