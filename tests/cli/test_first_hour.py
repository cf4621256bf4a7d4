"""What a new user meets first on the command line: help with defaults, errors in the flags they
typed, one rule for output files, budgets refused early, wrong inputs named."""

from __future__ import annotations

import argparse
import importlib
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.cli import main
from lora_extract.cli.flag_names import with_flag_names
from lora_extract.cli.main import build_parser
from lora_extract.extract.synthetic import demo_layers, write_pair

Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
K = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
B = "diffusion_model.input_blocks.0.0.bias"
VAE = "first_stage_model.decoder.conv_in.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("first_hour")), demo_layers(32), seed=3)


@pytest.fixture
def small_pair(tmp_path) -> tuple[str, str]:
    """to_q and a bias changed, to_k unchanged, a VAE weight in both: the smallest possible
    fp16 file is rank 1 of to_q ((32 + 32) * 2 bytes + a 4-byte alpha) plus the bias (32 * 2)."""
    g = torch.Generator().manual_seed(0)
    base = {Q: torch.randn(32, 32, generator=g), K: torch.randn(32, 32, generator=g),
            B: torch.randn(32, generator=g), VAE: torch.randn(4, 4, 3, 3, generator=g)}
    tuned = dict(base)
    tuned[Q] = base[Q] + 0.1 * torch.randn(32, 32, generator=g)
    tuned[B] = base[B] + 0.1
    folder = tmp_path / "models"
    folder.mkdir()
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return str(folder / "base.safetensors"), str(folder / "tuned.safetensors")


SMALLEST = (32 + 32) * 2 + 4 + 32 * 2          # 196 bytes
SHAPES_ONLY = SMALLEST + (32 + 32) * 2 + 4     # every layer assumed changed: 328 bytes


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# --- help ----------------------------------------------------------------------------------

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["extract", "demo", "validate", "resize"])
def test_help_shows_every_default(command: str) -> None:
    p = _subparsers()[command]
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        d = action.default
        if d is None or d is False or d == argparse.SUPPRESS:
            continue
        shown = " ".join(p._get_formatter()._expand_help(action).split())
        assert str(d) in shown and "default" in shown, (command, action.option_strings, shown)
    assert "<-" not in text


def test_help_defaults_are_the_real_ones() -> None:
    text = " ".join(_subparsers()["extract"].format_help().split())
    assert "--rank N rank of every LoRA layer; the cap with an adaptive --lora-type or --target-size (default: 8)" in text
    assert "(default: svd_linalg)" in text and "(default: fp16)" in text
    assert "this many MiB" in text   # the unit of --target-size


# --- errors name the flags ------------------------------------------------------------------

@pytest.mark.parametrize("message,expected", [
    ("target_size_mb 0.5 MiB is smaller ...; use target_size_mb >= 1.2 (or turn bias_diff off).",
     "--target-size 0.5 MiB is smaller ...; use --target-size >= 1.2 (or pass --no-bias-diff)."),
    ("rank 0 is out of range: use 1..4096.", "--rank 0 is out of range: use 1..4096."),
    ("rank 1 in each of the 3 LoRA layers", "rank 1 in each of the 3 LoRA layers"),
    ("output_dtype 'x' is not one of fp16, bf16, fp32.", "--dtype 'x' is not one of fp16, bf16, fp32."),
    ("use lora_type 'standard' (rank and conv_rank are then the per-layer caps)",
     "use --lora-type 'standard' (--rank and --conv-rank are then the per-layer caps)"),
    ("--target-size stays", "--target-size stays"),
])
def test_flag_names_in_messages(message: str, expected: str) -> None:
    assert with_flag_names(message) == expected


# --- one output rule --------------------------------------------------------------------------

def test_extract_never_writes_onto_an_input(small_pair, capsys) -> None:
    base, tuned = small_pair
    before = open(base, "rb").read()
    assert main(["extract", base, tuned, "-o", base, "--overwrite"]) == 2
    err = _err(capsys)
    assert "is the base model" in err and "--overwrite or not" in err
    assert open(base, "rb").read() == before
    # through another spelling of the same path
    other = os.path.join(os.path.dirname(tuned), ".", os.path.basename(tuned))
    assert main(["extract", base, tuned, "-o", other, "--overwrite"]) == 2
    assert "is the fine-tuned model" in _err(capsys)


def _no_work(monkeypatch) -> None:
    def fail(*_a, **_k):
        raise AssertionError("work started before the output path was checked")
    cli_main = importlib.import_module("lora_extract.cli.main")
    monkeypatch.setattr(cli_main, "run_extract", fail)
    monkeypatch.setattr(cli_main, "run_dry", fail)


def test_output_path_problems_are_found_before_any_work(small_pair, tmp_path, capsys,
                                                        monkeypatch) -> None:
    base, tuned = small_pair
    _no_work(monkeypatch)
    (tmp_path / "folder").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"mine")
    cases = [
        (["-o", str(tmp_path / "folder"), "--overwrite"], "is a folder; give a file name"),
        (["-o", str(tmp_path / "x.safetensors" / "o.safetensors")], "is a file, not a folder"),
        (["-o", str(tmp_path / "o.safetensors"), "--report", str(tmp_path / "o.safetensors")],
         "-o and --report both name"),
        (["-o", str(tmp_path / "o.safetensors"), "--report", base], "is the base model"),
    ]
    for args, needle in cases:
        assert main(["extract", base, tuned, *args]) == 2
        assert needle in _err(capsys)
    assert sorted(os.listdir(tmp_path)) == ["folder", "models", "x.safetensors"]
    existing = tmp_path / "x.safetensors"
    assert main(["extract", base, tuned, "-o", str(existing)]) == 2
    assert "already exists; pass --overwrite" in _err(capsys)
    assert existing.read_bytes() == b"mine"


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_refused_first(small_pair, tmp_path, capsys, monkeypatch) -> None:
    base, tuned = small_pair
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["extract", base, tuned, "-o", str(ro / "o.safetensors")]) == 2
        assert "is not writable" in _err(capsys)
    finally:
        ro.chmod(0o700)


def test_validate_chart_and_report_follow_the_same_rule(pair, tmp_path, capsys) -> None:
    lora = tmp_path / "l.safetensors"
    assert main(["extract", *pair, "-o", str(lora), "--rank", "4"]) == 0
    chart = tmp_path / "c.png"
    chart.write_bytes(b"not mine to replace")
    assert main(["validate", *pair, str(lora), "--chart", str(chart)]) == 2
    assert "c.png already exists; pass --overwrite" in capsys.readouterr().err
    assert chart.read_bytes() == b"not mine to replace"
    assert main(["validate", *pair, str(lora), "--report", str(lora), "--overwrite"]) == 2
    assert "is the LoRA" in capsys.readouterr().err


def test_output_files_get_the_users_permissions(small_pair, tmp_path, capsys) -> None:
    base, tuned = small_pair
    old = os.umask(0o022)
    try:
        out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
        assert main(["extract", base, tuned, "-o", str(out), "--report", str(rep)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644 == stat.S_IMODE(os.stat(rep).st_mode)


# --- budgets ------------------------------------------------------------------------------------

def _no_svd(monkeypatch) -> None:
    def fail(*_a, **_k):
        raise AssertionError("an SVD ran for a budget that cannot fit")
    monkeypatch.setattr("lora_extract.extract.budget.passes.decompose_at_cap", fail)


def test_impossible_budget_refused_before_any_svd(small_pair, tmp_path, capsys, monkeypatch) -> None:
    base, tuned = small_pair
    _no_svd(monkeypatch)
    out = tmp_path / "o.safetensors"
    budget = (SMALLEST - 1) / 2**20
    for extra in ([], ["--dry-run"]):
        args = ["--dry-run"] if extra else ["-o", str(out)]
        assert main(["extract", base, tuned, *args, "--target-size", f"{budget!r}"]) == 2
        err = _err(capsys)
        assert f"take {SMALLEST} bytes" in err and "use --target-size >= 0.001" in err
        assert "--no-bias-diff" in err and "target_size_mb" not in err
    assert not out.exists()


def test_budget_between_exact_and_shape_bound_still_runs(small_pair, tmp_path, capsys) -> None:
    # Above the exact smallest file, below the shapes-only bound: the early check must read the
    # differences (to_k did not change) and let the run go on.
    base, tuned = small_pair
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    budget = (SMALLEST + SHAPES_ONLY) / 2 / 2**20
    assert main(["extract", base, tuned, "-o", str(out), "--target-size", f"{budget!r}",
                 "--report", str(rep)]) == 0
    lora = load_file(str(out))
    assert sum(t.numel() * t.element_size() for t in lora.values()) == SMALLEST


def test_rank_cap_not_size_limited_the_file(pair, tmp_path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["extract", *pair, "-o", str(out), "--rank", "2", "--target-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "every layer is at its rank cap: the caps, not the size budget, limited this file" in text
    assert "--rank" in text and "-inf" not in text
    # a budget that binds says nothing of the caps
    assert main(["extract", *pair, "-o", str(tmp_path / "p.safetensors"), "--rank", "16",
                 "--target-size", "0.01"]) == 0
    assert "rank cap" not in capsys.readouterr().out


# --- wrong inputs ---------------------------------------------------------------------------------

def test_lora_given_as_a_model_is_named(pair, tmp_path, capsys) -> None:
    lora = tmp_path / "l.safetensors"
    assert main(["extract", *pair, "-o", str(lora), "--rank", "4"]) == 0
    capsys.readouterr()
    assert main(["extract", pair[0], str(lora), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = _err(capsys)
    assert "is a LoRA file" in err and "not a fine-tuned model" in err
    assert "lora-extract resize" in err and "lora-extract validate" in err
    assert "architecture" not in err
    assert main(["resize", str(lora), str(lora), "-r", "fro_lora=1,thr=-1", "-o",
                 str(tmp_path / "r")]) == 2
    assert "not a base model (CHECKPOINT comes first" in _err(capsys)


def test_swapped_models_are_pointed_out(pair, tmp_path, capsys) -> None:
    lora = tmp_path / "l.safetensors"
    assert main(["extract", *pair, "-o", str(lora), "--rank", "32", "--no-clamp",
                 "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["validate", *pair, str(lora)]) == 0
    assert "look swapped" not in capsys.readouterr().out
    assert main(["validate", pair[1], pair[0], str(lora)]) == 0
    assert "Base and fine-tuned look swapped" in capsys.readouterr().out


def test_vae_keys_are_reported_once(small_pair, tmp_path, capsys) -> None:
    base, tuned = small_pair
    rep = tmp_path / "r.json"
    assert main(["extract", base, tuned, "-o", str(tmp_path / "o.safetensors"),
                 "--report", str(rep)]) == 0
    import json
    layers = json.loads(rep.read_text())["layers"]
    assert [r["key"] for r in layers].count(VAE) == 1
    assert len(layers) == 4     # to_q, to_k, the bias, the VAE weight: one line each


# --- resize ----------------------------------------------------------------------------------------

def test_resize_without_recipe_shows_examples(pair, tmp_path, capsys) -> None:
    lora = tmp_path / "l.safetensors"
    assert main(["extract", *pair, "-o", str(lora), "--rank", "8"]) == 0
    capsys.readouterr()
    assert main(["resize", pair[0], str(lora), "-o", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    half = os.path.getsize(lora) / 2**20 / 2
    assert f"-r 'fro_ckpt=1,size={half:.3g}'" in err and "-r 'fro_ckpt=1,thr=-2.5'" in err
    assert not (tmp_path / "r").exists()


def test_resize_says_when_nothing_was_reduced(pair, tmp_path, capsys) -> None:
    lora = tmp_path / "l.safetensors"
    assert main(["extract", *pair, "-o", str(lora), "--rank", "8"]) == 0
    capsys.readouterr()
    assert main(["resize", pair[0], str(lora), "-r", "fro_ckpt=1,thr=-9", "-o",
                 str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "nothing was reduced" in out and "(the median score: keeps about half)" in out
    # the caches went to the cache folder, nothing new beside the models
    assert sorted(os.listdir(os.path.dirname(pair[0]))) == ["base.safetensors", "tuned.safetensors"]
