"""Bad model files through the command line: one clear line, exit 2, and no output file.

tests/extract/test_sources.py checks that the reader refuses each broken file; here every broken file
goes through a whole ``lora-extract extract`` run, as base and as fine-tuned model, and the
output folder must stay empty (no partial file, no temporary file).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_extract.cli import main

KEY = "diffusion_model.blocks.0.attn.qkv.weight"


def _raw(header: object, data: bytes, header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def _valid_bytes() -> bytes:
    t = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    return _raw({KEY: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, t.numpy().tobytes())


def _entry(dtype: str = "F32", shape: object = (4, 4), offsets: object = (0, 64)) -> dict:
    return {KEY: {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                  "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}}


def _zip_pickle() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({KEY: torch.ones(4, 4)}, buf)
    return buf.getvalue()


# (id, file bytes, words the one-line error must contain)
BROKEN_FILES: list[tuple[str, bytes, str]] = [
    ("empty file", b"", "not a safetensors file"),
    ("truncated in the length", b"\x10\x00\x00", "not a safetensors file"),
    ("truncated in the header", _valid_bytes()[:40], "header length"),
    ("truncated in the data", _valid_bytes()[:-1], "truncated"),
    ("header length past the end", _raw(_entry(), b"\0" * 64, header_len=10_000), "header length"),
    ("absurd header size", struct.pack("<Q", 2**63) + b"{}", "header length"),
    ("zero header size", struct.pack("<Q", 0) + b"\0" * 64, "not JSON"),
    ("offsets past the data", _raw(_entry(offsets=(64, 128)), b"\0" * 64), "truncated or corrupt"),
    ("negative offsets", _raw(_entry(offsets=(-64, 0)), b"\0" * 64), "truncated or corrupt"),
    ("offsets reversed", _raw(_entry(offsets=(64, 0)), b"\0" * 64), "truncated or corrupt"),
    ("offsets too short for the shape", _raw(_entry(offsets=(0, 32)), b"\0" * 64), "needs 64"),
    ("offsets overlapping", _raw({**_entry(offsets=(0, 64)),
                                  "diffusion_model.x.weight": {"dtype": "F32", "shape": [4, 4],
                                                               "data_offsets": [32, 96]}}, b"\0" * 96),
     "overlap"),
    ("unknown dtype", _raw(_entry(dtype="F4"), b"\0" * 64), "unsupported dtype 'F4'"),
    ("shape not integers", _raw(_entry(shape=[4.0, 4]), b"\0" * 64), "bad shape"),
    ("negative shape", _raw(_entry(shape=(-4, -4)), b"\0" * 64), "bad shape"),
    ("offsets missing", _raw({KEY: {"dtype": "F32", "shape": [4, 4]}}, b"\0" * 64), "malformed"),
    ("header is a list", _raw([1, 2], b""), "not a JSON object"),
    ("header not utf-8", _raw(b"\xff\xfe{}", b""), "not JSON"),
    ("header nested too deep", _raw(b"[" * 100_000, b""), "not JSON"),
    ("zip pickle named .safetensors", _zip_pickle(), "not a valid safetensors"),
    ("text file named .safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
     "not a valid safetensors"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = str(tmp_path_factory.mktemp("good") / "good.safetensors")
    save_file({KEY: torch.randn(4, 4), "diffusion_model.x.weight": torch.randn(4, 4)}, p)
    return p


def _run_cli(base: str, tuned: str, out_dir, capsys, *extra: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    rc = main(["extract", base, tuned, "-o", os.path.join(str(out_dir), "lora.safetensors"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("lora-extract: error: "), err
    assert os.listdir(out_dir) == []
    return err


@pytest.mark.parametrize("role", ["base", "tuned"])
@pytest.mark.parametrize("name,data,words", BROKEN_FILES, ids=[b[0] for b in BROKEN_FILES])
def test_broken_safetensors_is_one_clear_error_and_no_file(good, tmp_path, capsys, role: str,
                                                           name: str, data: bytes, words: str) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(data)
    args = (str(bad), good) if role == "base" else (good, str(bad))
    err = _run_cli(*args, tmp_path / "out", capsys)
    assert str(bad) in err and words in err


def test_file_that_shrinks_during_the_run_is_refused(good, tmp_path, monkeypatch) -> None:
    from lora_extract.extract import ExtractConfig, ExtractionInputError, SafetensorsSource, extract_to_file

    p = tmp_path / "tuned.safetensors"
    p.write_bytes(open(good, "rb").read())
    tuned = SafetensorsSource(str(p))
    os.truncate(p, os.path.getsize(p) - 40)  # e.g. a download being overwritten
    out = tmp_path / "out" / "lora.safetensors"
    with pytest.raises(ExtractionInputError, match="file ended while reading tensor"):
        extract_to_file(SafetensorsSource(good), tuned, ExtractConfig(rank=2), str(out))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    tuned.close()


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}], ids=["no keys", "only metadata"])
def test_empty_model_is_refused(good, tmp_path, capsys, header: dict) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(_raw(header, b""))
    err = _run_cli(str(empty), good, tmp_path / "out", capsys)
    assert "empty.safetensors: the model has no weights" in err


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_with_code_is_refused_through_cli_and_never_run(good, tmp_path, capsys, ext: str) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / f"evil{ext}"
    torch.save({"state_dict": {KEY: torch.ones(4, 4)}, "payload": Payload()}, str(evil))
    err = _run_cli(str(evil), good, tmp_path / "out", capsys)
    assert "refused to load this pickle checkpoint safely" in err and str(evil) in err
    assert not marker.exists()


def _pair_files(tmp_path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> tuple[str, str]:
    bp, tp = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    save_file(base, bp)
    save_file(tuned, tp)
    return bp, tp


def test_different_architectures_are_refused(tmp_path, capsys) -> None:
    bp, tp = _pair_files(tmp_path, {"diffusion_model.down.0.weight": torch.ones(4, 4)},
                         {"diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.ones(4, 4)})
    err = _run_cli(bp, tp, tmp_path / "out", capsys)
    assert "share no weight keys" in err and "Pick the matching base model" in err


def test_shared_key_with_other_shape_is_refused(tmp_path, capsys) -> None:
    bp, tp = _pair_files(tmp_path, {KEY: torch.ones(4, 4), "diffusion_model.a.weight": torch.ones(2, 2)},
                         {KEY: torch.ones(4, 4), "diffusion_model.a.weight": torch.ones(2, 3)})
    err = _run_cli(bp, tp, tmp_path / "out", capsys)
    assert "'diffusion_model.a.weight' has shape [2, 3]" in err and "[2, 2]" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("in_base", [False, True])
def test_nan_or_inf_in_a_file_is_refused(tmp_path, capsys, bad: float, in_base: bool) -> None:
    base = {KEY: torch.randn(8, 8), "diffusion_model.b.weight": torch.randn(8, 8)}
    tuned = {k: v + 0.1 for k, v in base.items()}
    (base if in_base else tuned)["diffusion_model.b.weight"][2, 5] = bad
    bp, tp = _pair_files(tmp_path, base, tuned)
    err = _run_cli(bp, tp, tmp_path / "out", capsys)
    assert "'diffusion_model.b.weight' in " + ("base" if in_base else "tuned") + ".safetensors" in err
    assert "NaN or Inf" in err


def test_identical_models_say_so_and_write_nothing(good, tmp_path, capsys) -> None:
    err = _run_cli(good, good, tmp_path / "out", capsys)
    assert "the two models are identical" in err and "no file was written" in err


@pytest.mark.parametrize("args,words", [
    (["--conv-rank", "4097"], "--conv-rank 4097 is out of range"),
    (["--rank", "-1"], "rank -1 is out of range"),
    (["--adaptive-param", "-0.01", "--lora-type", "adaptive_ratio"], "--adaptive-param -0.01"),
    (["--adaptive-param", "nan"], "--adaptive-param nan"),
    (["--lowrank-iters", "0"], "--lowrank-iters 0"),
    (["--alpha", "-1"], "alpha -1.0 must be >= 0"),
])
def test_more_bad_options_exit_2_before_reading(good, tmp_path, capsys, args: list[str], words: str) -> None:
    err = _run_cli(good, good, tmp_path / "out", capsys, *args)
    assert words in err


def test_metadata_names_are_never_used_as_paths(tmp_path, capsys) -> None:
    """Names a model file carries (``ss_output_name``, ``modelspec.title``) never choose a path."""
    evil = {"ss_output_name": "../../escaped", "modelspec.title": "/tmp/escaped_abs",
            "name": "..\\..\\escaped_win", "output_path": str(tmp_path / "escaped_here.safetensors")}
    work = tmp_path / "work"
    work.mkdir()
    base = {KEY: torch.randn(8, 8)}
    tuned = {KEY: base[KEY] + 0.1 * torch.randn(8, 8)}
    save_file(base, str(work / "base.safetensors"), metadata=evil)
    save_file(tuned, str(work / "tuned.safetensors"), metadata=evil)
    before = sorted(os.listdir(tmp_path))
    out = work / "out" / "lora.safetensors"
    assert main(["extract", str(work / "base.safetensors"), str(work / "tuned.safetensors"),
                 "-o", str(out), "--rank", "2"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == before
    assert sorted(os.listdir(work)) == ["base.safetensors", "out", "tuned.safetensors"]
    assert os.listdir(work / "out") == ["lora.safetensors"]
    assert not os.path.exists("/tmp/escaped_abs")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert not set(evil) & set(meta)  # the source's names are not copied into the LoRA either


def test_nul_byte_in_output_path_is_refused(good, tmp_path, capsys) -> None:
    base = {KEY: torch.randn(4, 4)}
    bp, tp = _pair_files(tmp_path, base, {KEY: base[KEY] + 1})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["extract", bp, tp, "-o", str(out_dir / "a\x00b.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "contains a NUL byte" in err and err.count("\n") == 1
    assert os.listdir(out_dir) == []


def test_only_unstored_differences_are_not_called_identical(tmp_path, capsys) -> None:
    base = {KEY: torch.randn(4, 4), "diffusion_model.blocks.0.attn.qkv.bias": torch.randn(4)}
    tuned = {KEY: base[KEY].clone(), "diffusion_model.blocks.0.attn.qkv.bias": base["diffusion_model.blocks.0.attn.qkv.bias"] + 1}
    bp, tp = _pair_files(tmp_path, base, tuned)
    err = _run_cli(bp, tp, tmp_path / "out", capsys, "--no-bias-diff")
    assert "identical" not in err
    assert "1 parameter(s) differ" in err and "qkv.bias" in err and "leave out --no-bias-diff" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device,words", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                          ("bogus", "is not a torch device")])
def test_unusable_device_is_refused_before_any_work(good, tmp_path, capsys, device: str, words: str) -> None:
    err = _run_cli(good, good, tmp_path / "out", capsys, "--device", device)
    assert f"device {device!r}" in err and words in err


def test_unwritable_report_path_is_one_line(tmp_path, capsys) -> None:
    base = {KEY: torch.randn(4, 4)}
    bp, tp = _pair_files(tmp_path, base, {KEY: base[KEY] + torch.randn(4, 4)})
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    rc = main(["extract", bp, tp, "-o", str(tmp_path / "o.safetensors"), "--report", str(blocker / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "blocker" in err and "Traceback" not in err


@pytest.mark.parametrize("field", ["rank", "conv_rank", "text_encoder_rank"])
def test_rank_limits_are_inclusive_and_named(field: str) -> None:
    """1 and 4096 are valid ranks (0 means "same as rank" for the optional ones); one past
    either end is refused with the field's name and value."""
    from lora_extract.extract import ExtractConfig, ExtractionInputError
    from lora_extract.extract.config import MAX_RANK

    lowest = 1 if field == "rank" else 0
    for ok in (lowest, 1, MAX_RANK):
        ExtractConfig(**{field: ok}).validate()
    for bad in (lowest - 1, MAX_RANK + 1):
        with pytest.raises(ExtractionInputError, match=f"{field} {bad} is out of range"):
            ExtractConfig(**{field: bad}).validate()


@pytest.mark.parametrize("cfg,words", [
    ({"key_style": "peft"}, "key_style 'peft' is not one of auto, comfy, kohya, diffusers."),
    ({"target_size_mb": 10.0, "lora_type": "full"},
     "target_size_mb 10 cannot be combined with lora_type 'full'"),
    ({"target_size_mb": 10.0, "lora_type": "adaptive_energy"},
     "target_size_mb 10 cannot be combined with lora_type 'adaptive_energy'"),
])
def test_config_errors_name_the_option_and_value(cfg: dict, words: str) -> None:
    from lora_extract.extract import ExtractConfig, ExtractionInputError

    with pytest.raises(ExtractionInputError) as e:
        ExtractConfig(**cfg).validate()
    assert words in str(e.value)
