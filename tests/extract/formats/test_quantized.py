"""Quantized safetensors, shards and diffusers folders: read as the float weights ComfyUI computes.

Each reader is checked against an oracle written here (tests/support/quant_files.py): the code values
times their scales, element by element, never through the pack's own decoding.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.cli.main import main
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.extract.formats import dequant
from lora_extract.extract.formats.dispatch import open_source
from lora_extract.extract.formats.quantized import QuantizedSource
from lora_extract.extract.formats.sharded import ShardedSafetensorsSource
from lora_extract.extract.source_info import describe, format_of, quantization_noise
from lora_extract.extract.sources import SafetensorsSource, has_raw_reads
from tests.support.helpers import optimal_rel_error
from tests.support.quant_files import (
    fp8_quantize,
    mxfp8_example,
    nvfp4_example,
    write_comfy_quant,
    write_scaled_fp8,
)


def _weights(seed: int = 0, n: int = 3, shape: tuple[int, int] = (64, 48)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.attn.qkv.weight": torch.randn(*shape, generator=g) * 0.05
            for i in range(n)}


OTHERS = {"blocks.0.norm.weight": torch.ones(48, dtype=torch.bfloat16),
          "blocks.0.attn.qkv.bias": torch.linspace(-1, 1, 64).to(torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_fp8_reads_the_weights_comfyui_computes(tmp_path, dtype) -> None:
    path = str(tmp_path / "m.safetensors")
    expect = write_scaled_fp8(path, _weights(), OTHERS, dtype)
    src = open_source(path)
    assert isinstance(src, QuantizedSource)
    assert sorted(src.keys()) == sorted(expect)  # marker and scale tensors hidden
    for k, want in expect.items():
        got = src.get(k)
        assert got.dtype == (torch.float32 if k.endswith("qkv.weight") else torch.bfloat16)
        assert torch.equal(got.float(), want), k
        assert src.shape(k) == tuple(want.shape)
    name = "float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2"
    assert format_of(src, "blocks.1.attn.qkv.weight") == f"{name} scaled"
    assert format_of(src, "blocks.0.norm.weight") == "bf16"
    assert quantization_noise(src, "blocks.0.norm.weight") is None
    assert describe(src, "base") == (f"base: m.safetensors: scaled fp8 (3 {name} scaled weights; "
                                     "2 other tensors unquantized)")
    # Codes read as numbers (what the pack did before) are thousands of times too large.
    raw = SafetensorsSource(path).get("blocks.0.attn.qkv.weight", dtype=torch.float32)
    assert raw.abs().max() > 100 * expect["blocks.0.attn.qkv.weight"].abs().max()


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "int8_tensorwise"])
@pytest.mark.parametrize("in_header", [False, True])
def test_comfy_quant_layers(tmp_path, fmt: str, in_header: bool) -> None:
    path = str(tmp_path / "q.safetensors")
    expect = write_comfy_quant(path, _weights(1), OTHERS, fmt, in_header)
    src = open_source(path)
    assert sorted(src.keys()) == sorted(expect)
    for k, want in expect.items():
        assert torch.equal(src.get(k).float(), want), k
    assert format_of(src, "blocks.2.attn.qkv.weight") == (
        f"{fmt} scaled" if fmt.startswith("float8") else fmt)


def test_nvfp4_and_mxfp8_decode_exactly() -> None:
    packed, blocked, ts, want = nvfp4_example(130, 64)   # 130 rows: a padded second row tile
    got = dequant.dequantize_nvfp4(packed, ts, blocked)
    assert torch.equal(got, want)
    codes, scales, want8 = mxfp8_example(40, 96)
    assert torch.equal(dequant.dequantize_mxfp8(codes, scales.view(torch.uint8)), want8)


def test_nvfp4_file(tmp_path) -> None:
    packed, blocked, ts, want = nvfp4_example(32, 64, seed=3)
    conf = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file({"l.weight": packed, "l.weight_scale": blocked, "l.weight_scale_2": ts,
               "l.comfy_quant": conf}, str(tmp_path / "n.safetensors"))
    src = open_source(str(tmp_path / "n.safetensors"))
    assert src.keys() == ["l.weight"] and src.shape("l.weight") == (32, 64)
    assert torch.equal(src.get("l.weight"), want)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
def test_noise_estimate_matches_the_rounding_error(tmp_path, fmt: str) -> None:
    w = _weights(5, n=1, shape=(256, 256))
    path = str(tmp_path / "q.safetensors")
    write_comfy_quant(path, w, {}, fmt)
    src = open_source(path)
    (k, original), = w.items()
    actual = float((src.get(k).double() - original.double()).norm())
    estimate = quantization_noise(src, k)
    assert estimate is not None
    assert 0.85 < estimate / actual < 1.15, (estimate, actual)


def test_fp8_step_table_against_neighbouring_codes() -> None:
    # Independent check: the step of a code is the gap to the next code of larger magnitude.
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        table = dequant.fp8_step_table(dt)
        for code in (1, 7, 8, 9, 60, 100):
            v = torch.tensor([code, code + 1], dtype=torch.uint8).view(dt).double()
            assert table[code].item() == pytest.approx(float(v[1] - v[0]) ** 2)


def _save_with_conf(path, fmt: str) -> None:
    conf = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    save_file({"blk.lin.weight": torch.zeros(8, 8, dtype=torch.int8),
               "blk.lin.weight_scale": torch.ones(()), "blk.lin.comfy_quant": conf}, path)


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8", "some_future_format"])
def test_unsupported_format_is_one_clear_error(tmp_path, fmt: str) -> None:
    path = str(tmp_path / "u.safetensors")
    _save_with_conf(path, fmt)
    with pytest.raises(ExtractionInputError, match=rf"'blk.lin.weight'.*'{fmt}'.*full-precision"):
        open_source(path)


def test_codes_without_a_format_are_refused(tmp_path) -> None:
    path = str(tmp_path / "c.safetensors")
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.int8)}, path)
    with pytest.raises(ExtractionInputError, match=r"'a.weight'.*int8 codes"):
        open_source(path)
    save_file({"a.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
               "a.weight_scale": torch.ones(())}, path)
    with pytest.raises(ExtractionInputError, match=r"'a.weight'.*weight_scale.*no quantization format"):
        open_source(path)


def test_plain_fp8_is_read_as_values(tmp_path) -> None:
    w = torch.randn(16, 16).to(torch.float8_e4m3fn)
    path = str(tmp_path / "p.safetensors")
    save_file({"x.weight": w}, path)
    src = open_source(path)
    assert torch.equal(src.get("x.weight"), w.float())
    assert format_of(src, "x.weight") == "float8_e4m3fn"


def test_plain_files_keep_the_raw_fast_path(tmp_path) -> None:
    path = str(tmp_path / "b.safetensors")
    save_file({"x.weight": torch.randn(4, 4).bfloat16()}, path)
    src = open_source(path)
    assert isinstance(src, SafetensorsSource) and has_raw_reads(src)
    assert quantization_noise(src, "x.weight") is None


def _shards(folder, tensors: dict[str, torch.Tensor], n: int = 3, index: bool = True) -> None:
    keys = sorted(tensors)
    wmap = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, os.path.join(folder, name))
        wmap.update({k: name for k in part})
    if index:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wmap}, f)


def test_sharded_by_index_and_by_folder(tmp_path) -> None:
    tensors = {**_weights(2), **{k: v.float() for k, v in OTHERS.items()}}
    _shards(tmp_path, tensors)
    for path in (tmp_path / "model.safetensors.index.json", tmp_path):
        src = open_source(str(path))
        assert isinstance(src, ShardedSafetensorsSource) and has_raw_reads(src)
        assert sorted(src.keys()) == sorted(tensors)
        for k, t in tensors.items():
            assert torch.equal(src.get(k), t)
            buf = torch.empty(src.nbytes(k), dtype=torch.uint8)
            assert torch.equal(src.read_elements(k, 1, 5, buf), t.reshape(-1)[1:5])


def test_sharded_quantized_composes(tmp_path) -> None:
    expect = write_scaled_fp8(str(tmp_path / "one.safetensors"), _weights(3), OTHERS)
    whole = load_file(str(tmp_path / "one.safetensors"))
    os.remove(tmp_path / "one.safetensors")
    _shards(tmp_path, whole)
    src = open_source(str(tmp_path))
    assert isinstance(src, QuantizedSource) and not has_raw_reads(src)
    assert sorted(src.keys()) == sorted(expect)
    for k, want in expect.items():
        assert torch.equal(src.get(k).float(), want)


def test_bad_index_is_refused(tmp_path) -> None:
    _shards(tmp_path, _weights(4))
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["blocks.0.attn.qkv.weight"] = "model-00002-of-00003.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(ExtractionInputError, match="do not match"):
        open_source(str(idx))
    data["weight_map"]["x"] = "model-00009-of-00009.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(ExtractionInputError, match="model-00009-of-00009.safetensors.*missing"):
        open_source(str(idx))


def _clip(width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"text_model.embeddings.token_embedding.weight": torch.randn(10, width, generator=g),
            "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(width, width, generator=g)}


def test_diffusers_folder(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for sub in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        (tmp_path / sub).mkdir()
    tr = {"transformer_blocks.0.attn.to_q.weight": torch.randn(8, 8),
          "transformer_blocks.0.attn.to_q.bias": torch.randn(8)}
    _shards(tmp_path / "transformer", tr, n=2)
    os.rename(tmp_path / "transformer" / "model.safetensors.index.json",
              tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    save_file(_clip(768, 1), str(tmp_path / "text_encoder" / "model.safetensors"))
    save_file({"shared.weight": torch.randn(10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight":
               torch.randn(4, 4)}, str(tmp_path / "text_encoder_2" / "model.safetensors"))
    save_file({"model.layers.0.mlp.weight": torch.randn(4, 4)},
              str(tmp_path / "text_encoder_3" / "model.safetensors"))
    save_file({"decoder.conv.weight": torch.randn(4, 4)}, str(tmp_path / "vae" / "d.safetensors"))
    src = open_source(str(tmp_path))
    assert sorted(src.keys()) == sorted([
        *tr, "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert torch.equal(src.get("transformer_blocks.0.attn.to_q.weight"),
                       tr["transformer_blocks.0.attn.to_q.weight"])
    assert "not read (text encoder type the pack does not map): text_encoder_3" in describe(src)


def _run(*args: str) -> None:
    assert main(["extract", *args, "--rank", "8", "--dtype", "fp32", "--no-clamp",
                 "--algorithm", "svd_linalg", "--overwrite"]) == 0


def _pair(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = _weights(seed, shape=(96, 80))
    g = torch.Generator().manual_seed(seed + 100)
    tuned = {k: v + (torch.randn(96, 12, generator=g) @ torch.randn(12, 80, generator=g)) * 0.01
             for k, v in base.items()}
    return base, tuned


def _check_rank8_optimal(lora_path: str, report_path: str, diffs: dict[str, torch.Tensor]) -> dict:
    lora = load_file(lora_path)
    report = json.loads(open(report_path).read())
    for k, d in diffs.items():
        m = k.removesuffix(".weight")
        up = lora[f"diffusion_model.{m}.lora_up.weight"]
        down = lora[f"diffusion_model.{m}.lora_down.weight"]
        err = float((up @ down - d).norm() / d.norm())
        assert err <= 1.001 * optimal_rel_error(d, 8), (k, err)
    return report


def test_cli_fp8_base_with_bf16_tune(tmp_path) -> None:
    base, tuned = _pair(7)
    deq_base = write_scaled_fp8(str(tmp_path / "base.safetensors"), base, {})
    save_file({k: v.bfloat16() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    out, rep = str(tmp_path / "l.safetensors"), str(tmp_path / "r.json")
    _run(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-o", out,
         "--report", rep)
    diffs = {k: tuned[k].bfloat16().float() - deq_base[k] for k in base}
    report = _check_rank8_optimal(out, rep, diffs)
    assert report["inputs"] == [
        "base: base.safetensors: scaled fp8 (3 float8_e4m3fn scaled weights)",
        "fine-tuned: tuned.safetensors: 3 bf16 tensors"]
    layers = [r for r in report["layers"] if r["status"] == "lora"]
    assert len(layers) == 3 and all(r["noise_floor"] > 0 for r in layers)


def test_cli_sharded_tune_with_single_file_base(tmp_path) -> None:
    base, tuned = _pair(8)
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tuned").mkdir()
    _shards(tmp_path / "tuned", tuned, n=2)
    out, rep = str(tmp_path / "l.safetensors"), str(tmp_path / "r.json")
    _run(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned"), "-o", out, "--report", rep)
    report = _check_rank8_optimal(out, rep, {k: tuned[k] - base[k] for k in base})
    assert report["inputs"][1] == "fine-tuned: model.safetensors (sharded): 2 shards (fp32)"
    assert all(r["noise_floor"] is None for r in report["layers"])


def test_noise_level_layers_flagged_and_left_out(tmp_path) -> None:
    base = _weights(9, n=2, shape=(128, 128))
    k_small, k_big = sorted(base)
    tuned = dict(base)
    g = torch.Generator().manual_seed(1)
    # One layer changed far below one fp8 step (pure rounding noise after quantization), one a lot.
    tuned[k_small] = base[k_small] + torch.randn(128, 128, generator=g) * 1e-4
    tuned[k_big] = base[k_big] + torch.randn(128, 4, generator=g) @ torch.randn(4, 128, generator=g) * 0.02
    write_scaled_fp8(str(tmp_path / "b.safetensors"), base, {})
    write_scaled_fp8(str(tmp_path / "t.safetensors"), tuned, {})
    args = [str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
            "-o", str(tmp_path / "l.safetensors"), "--report", str(tmp_path / "r.json")]
    _run(*args)
    layers = {r["key"]: r for r in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert layers[k_small]["at_noise_level"] and layers[k_small]["status"] == "lora"
    assert not layers[k_big]["at_noise_level"]
    assert layers[k_big]["noise_floor"] < 0.3
    _run(*args, "--skip-noise-layers")
    report = json.loads((tmp_path / "r.json").read_text())
    layers = {r["key"]: r for r in report["layers"]}
    assert layers[k_small]["status"] == "skipped"
    assert layers[k_small]["reason"].startswith("at the quantization noise floor")
    assert layers[k_big]["status"] == "lora"
    assert report["summary"]["noise_layers"] == 1


def test_v2_engine_reads_quantized_and_sharded(tmp_path) -> None:
    base, tuned = _pair(10)
    deq = write_scaled_fp8(str(tmp_path / "base.safetensors"), base, {})
    (tmp_path / "tuned").mkdir()
    _shards(tmp_path / "tuned", tuned, n=2)
    out, rep = str(tmp_path / "l.safetensors"), str(tmp_path / "r.json")
    _run(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned"), "-o", out, "--report", rep,
         "--v2")
    _check_rank8_optimal(out, rep, {k: tuned[k] - deq[k] for k in base})


def test_fp8_quantize_helper_is_comfyui_like() -> None:
    codes, scale = fp8_quantize(torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
    assert codes.dtype == torch.float8_e4m3fn and float(scale) == pytest.approx(4.0 / 448)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_table_decoding_equals_torch_bit_for_bit(dtype) -> None:
    from lora_extract.extract.formats.dequant import fp8_to_float32

    every = torch.arange(256, dtype=torch.uint8).view(dtype)
    ours, torchs = fp8_to_float32(every), every.to(torch.float32)
    nan = torchs.isnan()
    assert torch.equal(ours.isnan(), nan) and nan.any()
    assert torch.equal(ours[~nan].view(torch.int32), torchs[~nan].view(torch.int32))  # -0.0 too
    grid = every.reshape(16, 16).t()  # not contiguous: read in its logical order
    assert torch.equal(fp8_to_float32(grid).nan_to_num(7.0), grid.float().nan_to_num(7.0))
