"""The ``lora-extract`` command line: success, clear exit 2 on bad input, no partial files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lora_extract.cli import main
from lora_extract.extract.synthetic import demo_layers, write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("cli")), demo_layers(32), seed=7)


def test_extract_writes_file_and_report(pair, tmp_path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    rep = tmp_path / "r.json"
    rc = main(["extract", *pair, "-o", str(out), "--rank", "4", "--dtype", "bf16", "--report", str(rep),
               "--key-style", "kohya", "--algorithm", "svd_lowrank", "--lora-type", "adaptive_energy",
               "--adaptive-param", "0.9"])
    assert rc == 0
    lora = load_file(str(out))
    assert any(k.startswith("lora_unet_") for k in lora)
    report = json.loads(rep.read_text())
    assert report["config"]["output_dtype"] == "bf16"
    assert report["summary"]["rank_max"] <= 4
    assert "relative error" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "--rank 0 is out of range"),
    (["--rank", "5000"], "--rank 5000 is out of range"),
    (["--adaptive-param", "1.5"], "--adaptive-param 1.5"),
    (["--clamp-quantile", "0"], "--clamp-quantile 0"),
])
def test_bad_options_exit_2_without_file(pair, tmp_path, capsys, args, needle: str) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["extract", *pair, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_bad_file_exits_2(pair, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model at all, really")
    out = tmp_path / "o.safetensors"
    assert main(["extract", pair[0], str(bad), "-o", str(out)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_not_overwritten(pair, tmp_path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main(["extract", *pair, "-o", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["extract", *pair, "-o", str(out), "--overwrite"]) == 0
    assert load_file(str(out))


def test_demo_runs_as_console_command(tmp_path) -> None:
    exe = [sys.executable, "-m", "lora_extract.cli"]
    r = subprocess.run([*exe, "demo", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layers:" in r.stdout and "relative error" in r.stdout
    assert (tmp_path / "demo_lora.safetensors").exists()


def test_console_command_exits_with_mains_code_and_flushed_streams(tmp_path) -> None:
    # The command ends with os._exit (no interpreter teardown): its exit code and both
    # streams must still be main's, and no output file may be left behind.
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "lora_extract.cli", "extract", str(tmp_path / "missing.safetensors"),
                        str(tmp_path / "missing2.safetensors"), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "lora-extract: error:" in r.stderr and "missing.safetensors" in r.stderr
    assert not out.exists()


def test_console_script_entry_point_is_the_process_runner() -> None:
    tomllib = pytest.importorskip("tomllib")     # Python 3.11+
    from lora_extract.cli import run_as_process
    from tests.support.paths import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module, func = scripts["lora-extract"].split(":")
    assert module == "lora_extract.cli" and func == "run_as_process"
    assert callable(run_as_process)


def test_keyboard_interrupt_exits_130_without_file(pair, tmp_path, monkeypatch, capsys) -> None:
    import lora_extract.extract.layer_work as layer_work

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(layer_work, "process_pair", boom)
    out = tmp_path / "o.safetensors"
    assert main(["extract", *pair, "-o", str(out)]) == 130
    assert os.listdir(tmp_path) == []
