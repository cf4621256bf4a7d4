"""GGUF files: read as the ``gguf`` package's reference dequantizers read them, with the shapes
ComfyUI-GGUF gives them, their rounding noise estimated, and unknown types refused."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lora_extract.cli import main  # noqa: E402
from lora_extract.extract import ExtractionInputError, open_source  # noqa: E402
from lora_extract.extract.gguf_dequant import (  # noqa: E402
    TORCH_DEQUANTIZERS,
    dequantize_bytes,
    noise_norm,
    rounding_steps,
)
from lora_extract.extract.gguf_source import GGUFSource  # noqa: E402
from tests.support.paths import repo_module  # noqa: E402

gguf_files = repo_module("benchmarks/gguf_files.py")
quantize_q6_k, write_gguf = gguf_files.quantize_q6_k, gguf_files.write_gguf

QT = gguf.GGMLQuantizationType
ALL_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of the float16 scales in each block (kept finite in random blocks: a random
# float16 can be NaN/Inf, which no quantizer writes).
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    b = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        b[:, off:off + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("type_name", sorted(TORCH_DEQUANTIZERS))
def test_torch_dequantizers_equal_gguf_reference_bit_for_bit(type_name: str) -> None:
    rng = np.random.default_rng(3)
    if type_name == "BF16":
        raw = rng.standard_normal(4096).astype(np.float32)
        blocks = gguf.quants.quantize(raw, QT.BF16).reshape(-1, 2)
    else:
        # Enough blocks for several factor spans and value chunks, the last ones partial.
        blocks = random_blocks(type_name, 4500, rng)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    ref = gguf.quants.dequantize(blocks, QT[type_name]).reshape(-1)
    ours = dequantize_bytes(blocks.copy(), type_name, block_size, type_size).numpy()
    assert np.array_equal(bits(ours), bits(ref))


def _write_typed(path: str, tensors: dict[str, tuple[np.ndarray, str]],
                 orig_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    w = gguf.GGUFWriter(path=None, arch="wan")
    for name, shape in (orig_shapes or {}).items():
        w.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for name, (data, t) in tensors.items():
        w.add_tensor(name, data, raw_dtype=QT[t])
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory) -> str:
    """One 2-D tensor [48, 512] of every type (K-quants and friends as random valid blocks)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((48, 512)).astype(np.float32)
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        tensors[f"blocks.0.{t}.weight"] = (gguf.quants.quantize(x, QT[t]), t)
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        _, type_size = gguf.GGML_QUANT_SIZES[QT[t]]
        tensors[f"blocks.0.{t}.weight"] = (random_blocks(t, 48 * 2, rng).reshape(48, 2 * type_size), t)
    # ComfyUI-GGUF's convert tool flattens some conv weights to rows of 256 and records the shape.
    conv = rng.standard_normal((16, 8, 4, 4)).astype(np.float32)
    tensors["conv.weight"] = (gguf.quants.quantize(conv.reshape(-1, 256), QT.Q8_0), "Q8_0")
    tensors["norm.bias"] = (rng.standard_normal(48).astype(np.float32), "F32")
    path = str(tmp_path_factory.mktemp("gguf") / "every.gguf")
    _write_typed(path, tensors, {"conv.weight": (16, 8, 4, 4)})
    return path


def test_every_type_reads_as_the_reference_with_comfyui_gguf_shapes(every_type_file: str) -> None:
    src = open_source(every_type_file)
    assert isinstance(src, GGUFSource)
    reader = gguf.GGUFReader(every_type_file)
    assert set(src.keys()) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        want_shape = (16, 8, 4, 4) if t.name == "conv.weight" else tuple(int(v) for v in reversed(t.shape))
        assert src.shape(t.name) == want_shape, t.name
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        got = src.get(t.name)
        assert got.dtype == torch.float32 and tuple(got.shape) == want_shape
        assert np.array_equal(bits(got.numpy().reshape(-1)), bits(ref.reshape(-1))), t.name
        assert src.get(t.name, dtype=torch.float64).dtype == torch.float64
    assert src.format_of("blocks.0.Q8_0.weight") == "GGUF Q8_0"
    assert src.format_of("blocks.0.F16.weight") == "GGUF F16"
    assert src.describe().startswith("every.gguf: GGUF (F32 x 2, Q8_0 x 2, F16 x 1, ")
    assert "architecture wan" in src.describe()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K"])
def test_noise_estimate_matches_measured_rounding_error(tmp_path, type_name: str) -> None:
    """Quantize a known float tensor; the estimate from the stored scales is within 10% of the
    true error norm (random data: round-to-nearest error is close to uniform over the step)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((96, 1024)).astype(np.float32)
    q = quantize_q6_k(x) if type_name == "Q6_K" else gguf.quants.quantize(x, QT[type_name])
    path = str(tmp_path / "q.gguf")
    _write_typed(path, {"w": (q, type_name)})
    src = GGUFSource(path)
    measured = float(np.linalg.norm((src.get("w").numpy() - x).astype(np.float64)))
    est = src.quantization_noise("w")
    assert est is not None and 0.95 <= est / measured <= 1.10, (est, measured)


@pytest.mark.parametrize("type_name,sub,codes", [
    ("Q2_K", 16, 3), ("Q3_K", 16, 7), ("Q4_K", 32, 15), ("Q5_K", 32, 31), ("Q6_K", 16, 63)])
def test_k_quant_steps_are_the_grid_of_each_sub_block(type_name: str, sub: int, codes: int) -> None:
    """Independent check of the K-quant steps: every dequantized value of a sub-block lies on
    the grid lowest + step * k with integer 0 <= k <= codes."""
    rng = np.random.default_rng(2)
    blocks = random_blocks(type_name, 64, rng)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    y = gguf.quants.dequantize(blocks, QT[type_name]).astype(np.float64).reshape(-1, sub)
    steps = rounding_steps(blocks, type_name, block_size, type_size).numpy().reshape(-1, sub)
    assert np.allclose(steps, steps[:, :1])          # one step per sub-block
    step = steps[:, 0]
    live = step > 1e-6
    k = (y[live] - y[live].min(axis=1, keepdims=True)) / step[live, None]
    assert np.abs(k - np.rint(k)).max() < 1e-2
    assert np.rint(k).max() <= codes and np.rint(k).max() >= codes // 2


def test_float_types_have_no_noise_estimate(every_type_file: str) -> None:
    src = GGUFSource(every_type_file)
    for t in ("F32", "F16", "BF16"):
        assert src.quantization_noise(f"blocks.0.{t}.weight") is None
    assert src.quantization_noise("blocks.0.Q8_0.weight") > 0
    assert noise_norm(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(1.0)


def test_unknown_type_is_refused_naming_key_and_type(tmp_path) -> None:
    path = str(tmp_path / "ints.gguf")
    _write_typed(path, {"blocks.0.w": (np.arange(2048, dtype=np.int32).reshape(8, 256), "I32")})
    with pytest.raises(ExtractionInputError, match=r"'blocks\.0\.w'.*I32"):
        GGUFSource(path)


def test_not_gguf_and_missing_package_are_clear_errors(tmp_path, monkeypatch) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ExtractionInputError, match="bad.gguf: not a readable GGUF file"):
        open_source(str(bad))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ExtractionInputError, match="pip install gguf"):
        open_source(str(bad))


def test_gguf_is_not_a_safetensors_source(every_type_file: str) -> None:
    from lora_extract.extract.sources import SafetensorsSource

    assert not isinstance(open_source(every_type_file), SafetensorsSource)


def _tiny_pair(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    base = {"blocks.0.attn.q.weight": rng.standard_normal((256, 512)).astype(np.float32) * 0.05,
            "blocks.0.ffn.0.weight": rng.standard_normal((512, 256)).astype(np.float32) * 0.05,
            "blocks.0.ffn.0.bias": rng.standard_normal(512).astype(np.float32) * 0.05}
    tuned = {}
    for k, v in base.items():
        if v.ndim == 2:
            delta = rng.standard_normal((v.shape[0], 12)) @ rng.standard_normal((12, v.shape[1]))
            tuned[k] = (v + 0.01 * delta).astype(np.float32)
        else:
            tuned[k] = v + 0.001
    return base, tuned


def _optimum(diff: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(diff.double())
    return math.sqrt(float((s[rank:] ** 2).sum() / (s ** 2).sum()))


@pytest.mark.parametrize("base_type,tuned_type", [("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"),
                                                  ("Q6_K", "Q6_K"), ("BF16", "BF16"),
                                                  ("safetensors", "Q8_0")])
def test_cli_extracts_gguf_pairs_at_the_optimum(tmp_path, base_type: str, tuned_type: str) -> None:
    """Rank 8 exact from GGUF files (and a Q8_0 fine-tune over a safetensors base): every layer's
    error is the optimum of the dequantized difference (Eckart-Young) to 1.001x."""
    from safetensors.torch import load_file, save_file

    base, tuned = _tiny_pair(np.random.default_rng(9))
    if base_type == "safetensors":
        bp = str(tmp_path / "base.safetensors")
        save_file({"model.diffusion_model." + k: torch.from_numpy(v).to(torch.bfloat16)
                   for k, v in base.items()}, bp)
    else:
        bp = str(tmp_path / f"base-{base_type}.gguf")
        write_gguf(bp, base, base_type)
    tp = str(tmp_path / f"tuned-{tuned_type}.gguf")
    write_gguf(tp, tuned, tuned_type)
    out = tmp_path / "lora.safetensors"
    assert main(["extract", bp, tp, "-o", str(out), "--rank", "8", "--dtype", "fp32",
                 "--no-clamp", "--algorithm", "svd_linalg"]) == 0
    lora = load_file(str(out))
    b_src, t_src = open_source(bp), open_source(tp)
    for key in ("blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"):
        bkey = key if base_type != "safetensors" else "model.diffusion_model." + key
        diff = t_src.get(key) - b_src.get(bkey, dtype=torch.float32)
        mod = "diffusion_model." + key[: -len(".weight")]
        up, down = lora[mod + ".lora_up.weight"], lora[mod + ".lora_down.weight"]
        alpha = float(lora[mod + ".alpha"]) if mod + ".alpha" in lora else up.shape[1]
        approx = (up.double() @ down.double()) * (alpha / up.shape[1])
        err = float((approx - diff.double()).norm() / diff.double().norm())
        assert err <= 1.001 * _optimum(diff, 8) + 1e-7, (key, err, _optimum(diff, 8))
