"""Property-based fuzzing of the per-layer extraction and of the safetensors reader.

Invariants, whatever hypothesis throws at them:
- extraction: the only exceptions are our documented input errors (identical models, values
  that overflow the output dtype); outputs are finite; ranks lie in [1, min(cap, n)]; the error
  stated in the report is the error of the stored factors; with the exact SVD and no clamp the
  error is the optimal (Eckart-Young) one, and no algorithm beats it.
- reader: any byte string either opens or is refused with ExtractionInputError; an opened file
  hands out tensors of the declared shape and dtype, or refuses with ExtractionInputError.

Examples are derandomized (same cases on every run) and bounded so this file stays well under
the 40 s budget on CI's 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lora_extract.extract import (
    ExtractConfig,
    ExtractionInputError,
    NothingToExtract,
    SafetensorsSource,
    StateDictSource,
    extract_lora,
)
from lora_extract.extract.config import LORA_TYPES
from lora_extract.extract.sources import SAFETENSORS_DTYPES
from lora_extract.extract.writer import save_safetensors_atomic
from tests.support.helpers import matrix_with_spectrum

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SOURCE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
KEY = "diffusion_model.blocks.0.layer.weight"

shapes = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),                               # linear
    st.tuples(st.integers(1, 12), st.integers(1, 6), st.sampled_from([1, 3])),      # conv1d
    st.builds(lambda o, i, k: (o, i, k, k), st.integers(1, 12), st.integers(1, 6),
              st.sampled_from([1, 3])),                                              # conv2d
    st.tuples(st.integers(1, 8), st.integers(1, 4), st.just(1), st.just(2), st.just(2)),  # conv3d
)


# Largest spectrum scale (log10) per source dtype: beyond it the fine-tuned weights themselves
# would not fit the dtype (fp8 e4m3 tops out at 448, fp16 at 65504).
MAX_SCALE_LOG10 = {torch.float32: 6.0, torch.bfloat16: 6.0, torch.float16: 3.5,
                   torch.float8_e4m3fn: 1.5, torch.float8_e5m2: 2.5}


@st.composite
def spectra(draw, n: int, max_log10: float) -> torch.Tensor:
    """Singular values of the difference: decaying, flat, exactly low rank, or one value."""
    kind = draw(st.sampled_from(["geometric", "flat", "low_rank", "single", "zero"]))
    scale = 10 ** draw(st.floats(-4, max_log10))
    i = torch.arange(n, dtype=torch.float64)
    if kind == "geometric":
        s = draw(st.floats(0.2, 0.99)) ** i
    elif kind == "flat":
        s = torch.ones(n, dtype=torch.float64)
    elif kind == "low_rank":
        r = draw(st.integers(1, n))
        s = torch.where(i < r, 1.0 / (1 + i), torch.zeros(n, dtype=torch.float64))
    elif kind == "single":
        s = torch.zeros(n, dtype=torch.float64)
        s[0] = 1.0
    else:
        s = torch.zeros(n, dtype=torch.float64)
    return s * scale


@st.composite
def layer_cases(draw):
    shape = draw(shapes)
    m, n = shape[0], math.prod(shape[1:])
    src_dtype = draw(st.sampled_from(SOURCE_DTYPES))
    sigma = draw(spectra(min(m, n), MAX_SCALE_LOG10[src_dtype]))
    cfg = ExtractConfig(
        rank=draw(st.one_of(st.integers(1, 48), st.just(4096))),
        conv_rank=draw(st.sampled_from([0, 1, 3])),
        lora_type=draw(st.sampled_from(LORA_TYPES)),
        algorithm=draw(st.sampled_from(["svd_linalg", "svd_lowrank"])),
        lowrank_iters=draw(st.integers(1, 4)),
        output_dtype=draw(st.sampled_from(["fp16", "bf16", "fp32"])),
        adaptive_param=draw(st.floats(0.0, 1.0)),
        clamp_quantile=draw(st.sampled_from([None, 0.99, 1.0])),
        alpha=draw(st.sampled_from([0.0, 1.0, 16.0])),
        seed=draw(st.integers(0, 3)),
    ).validate()
    return shape, sigma, src_dtype, 10 ** draw(st.floats(-3, 0)), cfg, draw(st.integers(0, 2**31 - 1))


def _optimal_error(diff: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1).double())
    total = float((s ** 2).sum())
    return math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0


@FUZZ
@given(layer_cases())
def test_layer_extraction_invariants(case) -> None:
    shape, sigma, src_dtype, base_scale, cfg, seed = case
    g = torch.Generator().manual_seed(seed)
    m, n = shape[0], math.prod(shape[1:])
    base = (torch.randn(shape, generator=g) * base_scale).to(src_dtype)
    delta = matrix_with_spectrum(m, n, sigma, g).reshape(shape)
    tuned = (base.float() + delta).to(src_dtype)
    # The difference the extraction really sees: after the sources' rounding to their dtype.
    true_diff = tuned.double() - base.double()
    try:
        res = extract_lora(StateDictSource({KEY: base}, "base"), StateDictSource({KEY: tuned}, "tuned"),
                           cfg, prefetch=0)
    except NothingToExtract:
        assert not bool(true_diff.any()), "reported identical, but the weights differ"
        event("identical")
        return
    except ExtractionInputError as e:
        assert "overflow" in str(e) and cfg.output_dtype != "fp32", str(e)
        event("overflow refused")
        return
    event(f"extracted from {src_dtype}")
    assert bool(true_diff.any())
    (entry,) = res.report.layers
    for t in res.tensors.values():
        assert bool(torch.isfinite(t.float()).all())
    fro = float(true_diff.norm())
    if cfg.lora_type == "full":
        (stored,) = res.tensors.values()
        assert entry.status == "diff" and stored.shape == shape
        tol = {"fp32": 1e-6, "bf16": 8e-3, "fp16": 1e-3}[cfg.output_dtype]
        assert float((stored.double() - true_diff).norm()) <= tol * fro + 1e-30
        return
    prefix = KEY[: -len(".weight")]
    up, down = res.tensors[prefix + ".lora_up.weight"], res.tensors[prefix + ".lora_down.weight"]
    alpha = float(res.tensors[prefix + ".alpha"])
    rank = entry.rank
    cap = cfg.rank_cap(len(shape))
    assert rank is not None and 1 <= rank <= min(cap, m, n)
    assert up.shape == (m, rank, *([1] * (len(shape) - 2))) and down.shape == (rank, *shape[1:])
    rebuilt = (alpha / rank) * (up.double().reshape(m, rank) @ down.double().reshape(rank, n))
    measured = float((rebuilt - true_diff.reshape(m, n)).norm()) / fro
    # The stated error is the error of what was stored (float32 arithmetic in the pipeline).
    assert abs(measured - entry.rel_error) <= 2e-3 + 1e-3 * measured
    optimal = _optimal_error(true_diff, rank)
    assert entry.rel_error_unclamped >= optimal - 2e-3  # nothing beats Eckart-Young
    if cfg.algorithm == "svd_linalg":
        assert abs(entry.rel_error_unclamped - optimal) <= 2e-3
        if cfg.clamp_quantile is None and cfg.output_dtype == "fp32":
            assert measured <= optimal + 2e-3


# --- the safetensors reader ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.text(max_size=6), json_values),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([0, 2**62, 2**64, True])),
                                max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 300), min_size=2, max_size=2), json_values),
})


def _check_reader(data: bytes) -> None:
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            src = SafetensorsSource(path)
        except ExtractionInputError as e:
            assert path in str(e)
            return
        with src:
            for key in src.keys():
                try:
                    t = src.get(key)
                except ExtractionInputError:
                    continue
                assert tuple(t.shape) == src.shape(key) and t.dtype == src.dtype(key)
                assert src.get(key, dtype=torch.float32).shape == t.shape
    finally:
        os.unlink(path)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), entries, max_size=4),
       metadata=st.one_of(st.none(), json_values), data_len=st.integers(0, 300))
def test_reader_on_arbitrary_headers(header: dict, metadata, data_len: int) -> None:
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    _check_reader(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * 2 * (data_len > 0) + b"\0" * data_len)


@st.composite
def valid_files(draw) -> tuple[bytes, dict[str, torch.Tensor]]:
    tensors = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(list(SAFETENSORS_DTYPES.values())))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        tensors[f"k{i}"] = (torch.randn(shape) * 8).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.safetensors")
        save_safetensors_atomic(tensors, p)
        with open(p, "rb") as f:
            return f.read(), tensors


@FUZZ
@given(valid_files(), st.sampled_from(["none", "truncate", "flip", "length", "append"]), st.data())
def test_reader_on_mutated_valid_files(made, mutation: str, data) -> None:
    raw, tensors = made
    b = bytearray(raw)
    if mutation == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "length":
        b[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif mutation == "append":
        b += bytes(data.draw(st.integers(1, 64)))
    if mutation in ("none", "append"):
        # Untouched data: every tensor comes back bit for bit.
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(b))
        try:
            with SafetensorsSource(path) as src:
                for k, t in tensors.items():
                    got = src.get(k)
                    assert got.dtype == t.dtype and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        finally:
            os.unlink(path)
    else:
        _check_reader(bytes(b))
