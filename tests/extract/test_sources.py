"""The safetensors reader and pickle loading: exact tensors, clear refusals."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_extract.extract import ExtractionInputError, SafetensorsSource, StateDictSource, open_source
from lora_extract.extract.writer import save_safetensors_atomic


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.int64])
def test_reader_round_trips_every_dtype(tmp_path, dtype: torch.dtype) -> None:
    t = (torch.randn(5, 7) * 4).to(dtype)
    p = str(tmp_path / "a.safetensors")
    save_file({"x": t, "empty": torch.zeros(0, 3, dtype=dtype)}, p, metadata={"m": "1"})
    src = SafetensorsSource(p)
    assert src.shape("x") == (5, 7)
    assert torch.equal(src.get("x").view(torch.uint8), t.view(torch.uint8))
    assert src.get("empty").shape == (0, 3)
    assert src.get("x", dtype=torch.float32).dtype == torch.float32
    assert src.metadata == {"m": "1"}
    src.close()


def test_our_writer_is_read_by_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4).bfloat16(), "b": torch.arange(5), "c": torch.tensor(2.0)}
    p = str(tmp_path / "w.safetensors")
    save_safetensors_atomic(tensors, p, {"k": "v"})
    back = load_file(p)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    with pytest.raises(FileExistsError):
        save_safetensors_atomic(tensors, p)


@pytest.mark.parametrize("make,match", [
    (lambda: b"", "not a safetensors file"),
    (lambda: struct.pack("<Q", 10**12) + b"{}", "header length"),
    (lambda: struct.pack("<Q", 4) + b"\x80abc", "not JSON"),
    (lambda: _raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
    (lambda: _raw({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unsupported dtype"),
    (lambda: _raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    (lambda: _raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8"),
    (lambda: b"PK\x03\x04" + b"\0" * 100, "not a valid safetensors"),
])
def test_reader_refuses_lying_files(tmp_path, make, match: str) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(make())
    with pytest.raises(ExtractionInputError, match=match) as info:
        SafetensorsSource(str(p))
    assert str(p) in str(info.value)


def test_pickle_with_code_is_refused_and_never_run(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, str(p))
    with pytest.raises(ExtractionInputError, match="refused"):
        open_source(str(p))
    assert not marker.exists()


def test_plain_pickle_state_dict_loads(tmp_path) -> None:
    p = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2, 2)}}, str(p))
    src = open_source(str(p))
    assert isinstance(src, StateDictSource)
    assert src.keys() == ["w"]


def test_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(ExtractionInputError, match="no such file"):
        open_source(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.float8_e4m3fn, torch.int8])
def test_read_elements_and_read_into_match_get(tmp_path, dtype) -> None:
    t = (torch.randn(37, 53) * 4).to(dtype)
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.zeros(3), "w": t}, path)
    src = SafetensorsSource(path)
    whole = src.get("w")
    assert torch.equal(whole.view(torch.uint8), t.view(torch.uint8))
    buf = torch.empty(8 * 1000, dtype=torch.uint8)
    for lo, hi in [(0, 1), (5, 900), (1000, 37 * 53), (7, 7)]:
        part = src.read_elements("w", lo, hi, buf)
        assert torch.equal(part.view(torch.uint8), whole.reshape(-1)[lo:hi].view(torch.uint8))
    assert torch.equal(src.read_into("w", torch.empty(8 * 37 * 53, dtype=torch.uint8)).view(torch.uint8),
                       whole.view(torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        src.read_elements("w", 0, 37 * 53 + 1, buf)
    with pytest.raises(ValueError, match="buffer"):
        src.read_elements("w", 0, 1000, torch.empty(10, dtype=torch.uint8))


def test_a_combined_source_reports_each_part_as_stored(tmp_path) -> None:
    # How a key is stored is asked of the part that holds it (``owner_of``), not of the whole.
    from lora_extract.extract.source_info import describe, format_of
    from lora_extract.extract.te_sources import CombinedSource

    save_file({"a": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "b.safetensors"))
    both = CombinedSource([SafetensorsSource(tmp_path / "a.safetensors"),
                           SafetensorsSource(tmp_path / "b.safetensors")], "both")
    assert (format_of(both, "a"), format_of(both, "b")) == ("bf16", "fp16")
    assert describe(both) == "both: 1 bf16, 1 fp16 tensors"
