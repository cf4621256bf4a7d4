"""How GGUF weights are read, not just what they read as: every op of the CPU dequantization
stays below torch's parallel grain (so the reader thread never starts an OpenMP team beside
the SVD), the mapped file is never written and the results are the caller's own, and the
pages of a read tensor do not stay in the process's resident set."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

gguf = pytest.importorskip("gguf")

from lora_extract.extract import gguf_dequant  # noqa: E402
from lora_extract.extract.gguf_source import GGUFSource  # noqa: E402

QT = gguf.GGMLQuantizationType
VIEWS = {"__getitem__", "view", "reshape", "select"}  # no element is computed


class _OpSizes(TorchFunctionMode):
    """Records (name, numel of the result) of every torch call made inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):
            self.seen.append((getattr(func, "__name__", str(func)), result.numel()))
        return result


@pytest.mark.parametrize("type_name", sorted(gguf_dequant.KERNELS))
def test_cpu_dequantization_ops_stay_below_the_parallel_grain(type_name: str) -> None:
    """A tensor of 36 grains is dequantized without one computing op above GRAIN elements."""
    _, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    per_block = gguf_dequant.BLOCK_ELEMENTS[type_name]
    n_blocks = 36 * gguf_dequant.GRAIN // per_block + 3
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if type_name in ("F16", "BF16", "F32", "F64"):
        raw = np.zeros_like(raw)  # NaN bit patterns are irrelevant here; keep values finite
    blocks = torch.from_numpy(raw)
    out = torch.empty(n_blocks * per_block)
    with _OpSizes() as ops:
        gguf_dequant.dequantize_into(blocks, type_name, out)
    computed = [(name, n) for name, n in ops.seen if name not in VIEWS]
    assert any(name == "copy_" for name, _ in computed)
    assert max(n for _, n in computed) <= gguf_dequant.GRAIN, sorted(set(computed))[-3:]


def _write(path: str, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    w = gguf.GGUFWriter(path=None, arch="wan")
    for name, (data, t) in tensors.items():
        w.add_tensor(name, data, raw_dtype=QT[t])
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def q8_and_f32(tmp_path_factory) -> str:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 512)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("cost") / "m.gguf")
    _write(path, {"q": (gguf.quants.quantize(x, QT.Q8_0), "Q8_0"), "f": (x, "F32"),
                  "k": (np.asarray(gguf.quants.quantize(x, QT.Q8_0)), "Q8_0")})
    return path


def test_results_are_the_callers_and_the_file_is_never_written(q8_and_f32: str) -> None:
    with open(q8_and_f32, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    src = GGUFSource(q8_and_f32)
    for key in ("q", "f"):
        first = src.get(key)
        want = first.clone()
        first.add_(1.0)                       # the pipeline subtracts in place
        assert torch.equal(src.get(key), want), key
    src.close()
    with open(q8_and_f32, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before


def test_concurrent_reads_agree(q8_and_f32: str) -> None:
    """The reader thread and the main thread may read the same source at once."""
    src = GGUFSource(q8_and_f32)
    want = {k: src.get(k) for k in ("q", "f", "k")}
    errors: list[str] = []

    def read() -> None:
        for _ in range(20):
            for k, w in want.items():
                if not torch.equal(src.get(k), w):
                    errors.append(k)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_read_tensors_do_not_stay_resident(tmp_path) -> None:
    """Reading every tensor of a 48 MiB file leaves well under one tensor's pages mapped in:
    without dropping them, all 48 MiB would stay counted in the resident set."""
    rng = np.random.default_rng(3)
    path = str(tmp_path / "big.gguf")
    _write(path, {f"w{i}": (rng.standard_normal((1024, 1536)).astype(np.float32), "F32")
                  for i in range(8)})
    assert os.path.getsize(path) > 48 * 2**20
    src = GGUFSource(path)
    before = _rss_file_kib()
    for key in src.keys():
        src.get(key)
    grown_mib = (_rss_file_kib() - before) / 1024
    assert grown_mib < 6, grown_mib


def test_device_reads_dequantize_on_the_device_and_equal_cpu_reads(tmp_path) -> None:
    """On an accelerator (emulated here) only the codes are moved, every type's kernels run
    whole on the device, and the values equal the CPU's chunked ones bit for bit."""
    from tests.support.emulated_cuda import emulated_cuda, on_device

    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    tensors = {t: (gguf.quants.quantize(x, QT[t]), t)
               for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")}
    f16_fields = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    for t, fields in f16_fields.items():
        _, type_size = gguf.GGML_QUANT_SIZES[QT[t]]
        raw = rng.integers(0, 256, (128, type_size), dtype=np.uint8)
        for off in fields:  # finite scales: a random float16 may be NaN
            raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (128, 1)).astype(np.float16).view(np.uint8)
        tensors[t] = (raw.reshape(64, -1), t)
    path = str(tmp_path / "all.gguf")
    _write(path, tensors)
    src = GGUFSource(path)
    cpu = {k: src.get(k) for k in src.keys()}
    with emulated_cuda():
        for k in src.keys():
            w = src.get(k, "cuda")
            assert on_device(w), k
            assert torch.equal(w.cpu().view(torch.int32), cpu[k].view(torch.int32)), k


def test_big_endian_files_are_refused_clearly(tmp_path) -> None:
    """Bytes are read as they lie, so a big-endian file would give wrong numbers: refused."""
    from lora_extract.extract import ExtractionInputError

    path = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(path=None, arch="wan", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("w", np.ones((4, 8), dtype=np.float32).byteswap(), raw_dtype=QT.F32)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExtractionInputError, match=r"be\.gguf: a big-endian GGUF file"):
        GGUFSource(path)


def test_rare_types_read_through_gguf_quants_from_the_same_mapping(tmp_path) -> None:
    """A type without a torch kernel (IQ4_NL) is read from the same mapping and dequantized by
    the reference itself: equal to it bit for bit."""
    bs, ts = gguf.GGML_QUANT_SIZES[QT.IQ4_NL]
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, (64, ts), dtype=np.uint8)
    raw[:, :2] = rng.uniform(-0.05, 0.05, (64, 1)).astype(np.float16).view(np.uint8)
    path = str(tmp_path / "iq.gguf")
    _write(path, {"iq": (raw.reshape(8, -1), "IQ4_NL")})
    src = GGUFSource(path)
    assert src.shape("iq") == (8, 8 * bs)
    want = gguf.quants.dequantize(raw, QT.IQ4_NL).astype(np.float32).reshape(-1)
    assert np.array_equal(src.get("iq").numpy().reshape(-1).view(np.uint32), want.view(np.uint32))
