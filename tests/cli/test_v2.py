"""The command line's device choice and its V2 engine: the same file, byte for byte, as the
LoraExtractV2 node (through the ComfyUI stub) for the same settings on the same pair."""

from __future__ import annotations

import os

import pytest
import torch
from comfy.model_patcher import ModelPatcher
from safetensors.torch import load_file

import lora_extract.cli.extract_streamed as cli_v2
from lora_extract.cli import main
from lora_extract.cli.main import build_parser
from lora_extract.extract.devices import resolve_device
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.extract.synthetic import demo_layers, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.helpers import call_node, module_from_state_dict


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    # bf16 files: the difference is formed from a storage dtype, as from real checkpoints.
    return write_pair(str(tmp_path_factory.mktemp("clipair")), demo_layers(32), seed=11,
                      dtype=torch.bfloat16)


def _patcher(path: str) -> ModelPatcher:
    # Each model loaded on its own, as UNETLoader gives two MODELs (no patches in between).
    return ModelPatcher(module_from_state_dict(load_file(path)), torch.device("cpu"),
                        torch.device("cpu"))


NODE_ARGS = dict(rank=6, lora_type="standard", algorithm="svd_lowrank", lowrank_iters=3,
                 output_dtype="fp16", bias_diff=True, adaptive_param=0.15, clamp_quantile=True)
CLI_ARGS = ["--rank", "6", "--lora-type", "standard", "--algorithm", "svd_lowrank",
            "--lowrank-iters", "3", "--dtype", "fp16", "--clamp-quantile", "0.99"]


@pytest.mark.parametrize("mode,blocks,batch,ahead,extra_node,extra_cli", [
    ("balanced", 10, 4, 2, {}, []),
    ("aggressive", 3, 2, 0, {"lora_type": "adaptive_energy", "adaptive_param": 0.8,
                             "algorithm": "svd_linalg", "key_style": "kohya"},
     ["--lora-type", "adaptive_energy", "--adaptive-param", "0.8", "--algorithm", "svd_linalg",
      "--key-style", "kohya"]),
    ("conservative", 0, 1, 1, {}, []),
])
def test_cli_v2_writes_the_node_file_byte_for_byte(bf16_pair, comfy_dirs, tmp_path, monkeypatch,
                                                   mode, blocks, batch, ahead, extra_node,
                                                   extra_cli) -> None:
    monkeypatch.setattr("lora_extract.memory.cache.RESIDENT", ResidentCache())
    base_path, tuned_path = bf16_pair
    node_path = call_node(NODE_CLASS_MAPPINGS["LoraExtractV2"],
        finetuned_model=_patcher(tuned_path), original_model=_patcher(base_path),
        filename_prefix="loras/v2", **{**NODE_ARGS, **extra_node}, vram_usage_mode=mode,
        blocks_in_gpu=blocks, batch_size=batch, prefetch_ahead=ahead)["result"][0]
    out = tmp_path / "cli.safetensors"
    engine = cli_v2.extract_to_file_streamed
    calls: list[object] = []
    monkeypatch.setattr(cli_v2, "extract_to_file_streamed",
                        lambda *a, **k: calls.append(a[3]) or engine(*a, **k))
    # Later args win in argparse: extra_cli overrides CLI_ARGS like extra_node overrides NODE_ARGS.
    rc = main(["extract", base_path, tuned_path, "-o", str(out), *CLI_ARGS, *extra_cli,
               "--vram-mode", mode, "--blocks-in-gpu", str(blocks), "--batch-size", str(batch),
               "--prefetch-ahead", str(ahead)])
    assert rc == 0
    assert [o.mode for o in calls] == [mode]          # the V2 engine ran, with the mode given
    node_bytes, cli_bytes = open(node_path, "rb").read(), out.read_bytes()
    assert len(load_file(str(out))) > 10

    assert cli_bytes == node_bytes     # same tensors, same bytes, same metadata (header)


def test_auto_device_is_cpu_without_cuda_and_lands_in_metadata(bf16_pair, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = build_parser().parse_args(["extract", *bf16_pair, "-o", "x"])
    assert a.device == "auto"
    out = tmp_path / "o.safetensors"
    assert main(["extract", *bf16_pair, "-o", str(out), "--rank", "4"]) == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["lora_extract.device"] == '"cpu"'


def test_auto_device_picks_cuda_when_torch_has_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ExtractionInputError, match=r"has 2 CUDA device\(s\), numbered 0..1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device,needle", [
    ("cuda", "CUDA is not available to this torch"),
    ("cuda:0", "CUDA is not available to this torch"),
    ("gpu", "'gpu' is not a torch device"),
    ("meta", "meta is not supported for extraction"),
])
def test_unusable_device_is_one_line_exit_2(bf16_pair, tmp_path, capsys, monkeypatch,
                                            device, needle) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o.safetensors"
    assert main(["extract", *bf16_pair, "-o", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_mps_is_refused_where_torch_has_none(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ExtractionInputError, match="MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "9"], "--batch-size 9 is out of range"),
    (["--blocks-in-gpu", "41"], "--blocks-in-gpu 41 is out of range"),
    (["--memory-threshold", "0.99"], "--memory-threshold 0.99 is out of range"),
])
def test_bad_v2_knobs_exit_2_without_file(bf16_pair, tmp_path, capsys, args, needle) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["extract", *bf16_pair, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_memory_log_prints_the_v2_debug_block(bf16_pair, tmp_path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["extract", *bf16_pair, "-o", str(out), "--rank", "4", "--memory-log"]) == 0
    text = capsys.readouterr().out
    assert "VRAM mode: balanced (budget n/a, device cpu)" in text
    assert f"LoRA saved to: {out}" in text
