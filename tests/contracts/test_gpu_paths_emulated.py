"""Every path that places tensors, run with ``device="cuda"`` on the emulated accelerator.

``tests/support/emulated_cuda.py`` marks tensors moved to the device and raises CUDA's own error when a
device tensor meets a CPU tensor, so a misplaced tensor fails here as it fails on a GPU (the
first GPU run crashed on: ``stored.float() - diff`` in ``process_pair``). Results must match a CPU
run, and what is written must be plain CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_extract.extract.pair_output as pair_output
from lora_extract.cli import main
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.sources import SafetensorsSource
from lora_extract.extract.synthetic import demo_layers, make_pair, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MODES, MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from lora_extract.validation.validate import validate_lora
from tests.memory.test_streamer_order import ModelLikeSource, RecordingStreams
from tests.support.emulated_cuda import on_device
from tests.support.fault_injection import OnNthCall

OOM = torch.OutOfMemoryError
QKV = "diffusion_model.blocks.0.self_attn.qkv.weight"


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    return make_pair(demo_layers(40), seed=21, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("pair")), demo_layers(40), seed=21,
                      dtype=torch.bfloat16)


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    # The same keys; their order follows the source's listing (a file lists them sorted, as the
    # writer stores them), and the written file is sorted either way.
    assert sorted(got) == sorted(ref)
    for k, t in got.items():
        assert type(t) is torch.Tensor and t.device.type == "cpu", k   # written from the host
        torch.testing.assert_close(t.float(), ref[k].float(), rtol=2e-3, atol=2e-5)


def _sources(pair, kind: str, files=None):
    if kind == "file":
        return SafetensorsSource(files[0]), SafetensorsSource(files[1])
    cls = ModelLikeSource if kind == "model" else StateDictSource
    return cls(pair[0], "base"), cls(pair[1], "tuned")


@pytest.mark.parametrize("lora_type,param", [("standard", 0.0), ("full", 0.0),
                                              ("adaptive_energy", 0.9), ("adaptive_ratio", 0.3)])
@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_v1_on_the_device_matches_the_cpu(emulated_gpu, pair, algorithm, lora_type, param) -> None:
    cfg = dict(rank=6, algorithm=algorithm, lora_type=lora_type, adaptive_param=param,
               output_dtype="fp32")
    ref = extract_lora(*_sources(pair, "dict"), ExtractConfig(**cfg))
    moved = emulated_gpu.moved_to_device
    out = extract_lora(*_sources(pair, "dict"), ExtractConfig(**cfg, device="cuda"))
    assert emulated_gpu.moved_to_device > moved
    assert [r.rank for r in out.report.layers] == [r.rank for r in ref.report.layers]
    _close(out.tensors, ref.tensors)
    # The .diff branch's report line (the crash site) is measured, on the device, as on the CPU.
    for a, b in zip(out.report.layers, ref.report.layers, strict=True):
        assert (a.rel_error is None) == (b.rel_error is None)
        if a.rel_error is not None:
            assert a.rel_error == pytest.approx(b.rel_error, abs=1e-4)


def test_randomized_svd_on_the_device(emulated_gpu) -> None:
    """Layers wide enough for the randomized path (the sketch is drawn on the CPU and moved)."""
    import lora_extract.extract.layer as layer

    base, tuned = make_pair(demo_layers(96), seed=2)
    cfg = dict(rank=4, algorithm="svd_lowrank", output_dtype="fp32")
    assert not layer.svd_plan(96, 96, ExtractConfig(**cfg), 4)[0]      # randomized, not exact
    ref = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(**cfg))
    dev = ExtractConfig(**cfg, device="cuda")
    v1 = extract_lora(StateDictSource(base), StateDictSource(tuned), dev)
    v2 = extract_lora_streamed(StateDictSource(base), StateDictSource(tuned), dev,
                         MemoryOptions(mode="aggressive"), cache=ResidentCache()).result
    # On CUDA the power iterations run in bfloat16 (decompose.power_dtype), so the factors are
    # not the CPU's bit for bit: the same ranks, host tensors, and errors within 1.001x of the
    # CPU run's (which is within 1.001x of the optimum, extract/test_randomized_accuracy.py).
    for out in (v1, v2):
        assert list(out.tensors) == list(ref.tensors)
        assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in out.tensors.values())
        assert [r.rank for r in out.report.layers] == [r.rank for r in ref.report.layers]
        checked = 0
        for a, b in zip(out.report.layers, ref.report.layers, strict=True):
            if b.rel_error is not None and b.rank:
                assert a.rel_error <= b.rel_error * 1.001 + 1e-6, a.key
                checked += 1
        assert checked >= 3


def test_randomized_svd_on_the_device_in_float32_matches_the_cpu(emulated_gpu, monkeypatch) -> None:
    """With float32 iterations forced, the device path is the CPU's arithmetic: a sketch, a
    basis or a factor on the wrong device, or drawn differently, shows up as a mismatch."""
    import lora_extract.extract.decompose as decompose
    import lora_extract.extract.layer as layer

    monkeypatch.setattr(decompose, "power_dtype", lambda device: torch.float32)
    base, tuned = make_pair(demo_layers(96), seed=2)
    cfg = dict(rank=4, algorithm="svd_lowrank", output_dtype="fp32")
    assert not layer.svd_plan(96, 96, ExtractConfig(**cfg), 4)[0]
    ref = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(**cfg))
    dev = ExtractConfig(**cfg, device="cuda")
    _close(extract_lora(StateDictSource(base), StateDictSource(tuned), dev).tensors, ref.tensors)
    out = extract_lora_streamed(StateDictSource(base), StateDictSource(tuned), dev,
                          MemoryOptions(mode="aggressive"), cache=ResidentCache())
    _close(out.result.tensors, ref.tensors)


@pytest.mark.parametrize("kind", ["dict", "file", "model"])
@pytest.mark.parametrize("ahead", [0, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_v2_on_the_device_matches_v1(emulated_gpu, pair, files, mode, ahead, kind) -> None:
    cfg = ExtractConfig(rank=6, output_dtype="fp16")
    ref = extract_lora(*_sources(pair, "dict"), cfg)
    cfg_dev = ExtractConfig(rank=6, output_dtype="fp16", device="cuda")
    out = extract_lora_streamed(*_sources(pair, kind, files), cfg_dev,
                          MemoryOptions(mode=mode, prefetch_ahead=ahead), cache=ResidentCache())
    assert out.memory.batched_svd and out.memory.bytes_moved > 0
    _close(out.result.tensors, ref.tensors)


def test_v2_device_streams_keep_their_order_with_device_tensors(emulated_gpu, pair) -> None:
    rec = RecordingStreams(device=torch.device("cuda", 0))
    cfg = ExtractConfig(rank=6, output_dtype="fp32", device="cuda")
    cache = ResidentCache()
    srcs = _sources(pair, "dict")
    runs = [extract_lora_streamed(*srcs, cfg, MemoryOptions(mode="maximum"), cache=cache, streams=rec)
            for _ in range(2)]
    assert rec.violations == [] and rec.events
    assert runs[1].memory.cache_hits > 0               # the second run took resident differences
    assert all(on_device(e.diff) for e in cache._entries.values())
    _close(runs[1].result.tensors, runs[0].result.tensors)


class OomOnDevice:
    """A source that runs out of device memory for ``key`` (real device tensors otherwise)."""

    def __init__(self, inner, key: str, times: int = 1) -> None:
        self._inner, self.name, self.key, self.left = inner, inner.name, key, times

    def keys(self):
        return self._inner.keys()

    def shape(self, key):
        return self._inner.shape(key)

    def get(self, key, device="cpu", dtype=None):
        if key == self.key and torch.device(device).type != "cpu" and self.left > 0:
            self.left -= 1
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._inner.get(key, device, dtype)


def test_v1_oom_fallback_on_the_device(emulated_gpu, pair, monkeypatch) -> None:
    base, tuned = _sources(pair, "dict")
    ref = extract_lora(base, tuned, ExtractConfig(rank=4, output_dtype="fp32"))
    cfg = ExtractConfig(rank=4, output_dtype="fp32", device="cuda")
    res = extract_lora(base, OomOnDevice(tuned, QKV), cfg, prefetch=2)
    assert any("out of memory on cuda" in n for n in res.report.notes)
    _close(res.tensors, ref.tensors)
    calls = emulated_gpu.empty_cache_calls

    def runs_out(diff, *_a, **_k) -> None:
        assert on_device(diff)
        raise OOM("CUDA out of memory")
    monkeypatch.setattr(pair_output, "extract_matrix", OnNthCall(pair_output.extract_matrix, 2, runs_out))
    res = extract_lora(base, tuned, cfg, prefetch=2)
    assert emulated_gpu.empty_cache_calls > calls      # the cache was released before the retry
    _close(res.tensors, ref.tensors)


def test_v2_oom_fallbacks_on_the_device(emulated_gpu, pair, monkeypatch) -> None:
    import lora_extract.memory.batch_decompose as batch_decompose
    import lora_extract.memory.streamed_extract as streamed

    ref = extract_lora(*_sources(pair, "dict"), ExtractConfig(rank=4, output_dtype="fp32"))
    cfg = ExtractConfig(rank=4, output_dtype="fp32", device="cuda")
    rec = RecordingStreams(device=torch.device("cuda", 0), oom_on=QKV)
    real_stage = streamed.PairStreamer._stage_and_copy

    def tagged(self, p, staged, streams):
        rec.copying_key = p.tuned_key
        return real_stage(self, p, staged, streams)
    monkeypatch.setattr(streamed.PairStreamer, "_stage_and_copy", tagged)
    out = extract_lora_streamed(*_sources(pair, "dict"), cfg, MemoryOptions(mode="balanced"),
                          cache=ResidentCache(), streams=rec)
    assert any(QKV in e for e in out.memory.oom_events)       # copied: extracted on the CPU
    _close(out.result.tensors, ref.tensors)
    # Out of memory in every batched SVD: the batch halves down to one layer, then the CPU.
    real = batch_decompose.batched.extract_matrices
    monkeypatch.setattr(batch_decompose.batched, "extract_matrices",
                        lambda *a, **k: (_ for _ in ()).throw(OOM("CUDA out of memory")))

    def single(diff, *a, **k):
        if on_device(diff):
            raise OOM("CUDA out of memory")
        return real_extract(diff, *a, **k)
    real_extract = batch_decompose.extract_matrix
    monkeypatch.setattr(batch_decompose, "extract_matrix", single)
    out = extract_lora_streamed(*_sources(pair, "dict"), cfg, MemoryOptions(mode="aggressive", batch_size=4),
                          cache=ResidentCache())
    assert any("alone: extracted on the CPU" in e for e in out.memory.oom_events)
    _close(out.result.tensors, ref.tensors)
    del real


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
def test_fp8_and_half_inputs_on_the_device(emulated_gpu, dtype) -> None:
    base, tuned = make_pair(demo_layers(24), seed=5, dtype=dtype)
    ref = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(rank=4))
    cfg = ExtractConfig(rank=4, device="cuda")
    _close(extract_lora(StateDictSource(base), StateDictSource(tuned), cfg).tensors, ref.tensors)
    out = extract_lora_streamed(StateDictSource(base), StateDictSource(tuned), cfg,
                          MemoryOptions(mode="aggressive"), cache=ResidentCache())
    _close(out.result.tensors, ref.tensors)


def test_validation_on_the_device(emulated_gpu, pair, files, tmp_path) -> None:
    lora = extract_lora(*_sources(pair, "dict"), ExtractConfig(rank=4, output_dtype="fp32")).tensors
    reports = {}
    for dev in ("cpu", "cuda"):
        moved = emulated_gpu.moved_to_device
        reports[dev] = validate_lora(*_sources(pair, "dict"), StateDictSource(lora, "l"), device=dev,
                                     spectrum_layers=4)
        assert (emulated_gpu.moved_to_device > moved) == (dev == "cuda")
    for a, b in zip(reports["cpu"].layers, reports["cuda"].layers, strict=True):
        assert (a.key, a.status, a.rank) == (b.key, b.status, b.rank)
        assert a.rel_error == pytest.approx(b.rel_error, abs=1e-5)
    # The command line with --device cuda.
    path = str(tmp_path / "l.safetensors")
    save_file(lora, path)
    assert main(["validate", *files, path, "--device", "cuda"]) == 0


def test_resize_on_the_device(emulated_gpu, tmp_path, gen) -> None:
    from lora_extract.resize import BaseModel, ResizeOptions, open_lora_input, parse_recipes, resize_lora
    from tests.support.resize_fixtures import UNET, kohya_layer, lora_pair, make_base, spectrum

    base_path, base_sd = make_base(str(tmp_path), gen)
    key = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    rows, cols = base_sd[UNET + key + ".weight"].shape
    sd: dict[str, torch.Tensor] = {}
    prefix = "lora_unet_" + key.replace(".", "_")
    kohya_layer(sd, prefix, *lora_pair(rows, (cols,), spectrum(8, 0.5, 0.5), gen, 4.0), 4.0)
    lora_path = str(tmp_path / "l.safetensors")
    save_file(sd, lora_path)
    files = {}
    for dev in ("cpu", "cuda"):
        moved = emulated_gpu.moved_to_device
        rep = resize_lora(BaseModel.open(base_path), open_lora_input(lora_path),
                          parse_recipes("spn_lora,thr=-0.95:fro_ckpt=3,spn_lora=1,size=0.002"),
                          str(tmp_path / dev), ResizeOptions(output_dtype="fp32", device=dev))
        assert (emulated_gpu.moved_to_device > moved) == (dev == "cuda")
        assert rep.outcomes and all(o.layers for o in rep.outcomes)
        files[dev] = [load_file(o.output_path) for o in rep.outcomes]
    for a, b in zip(files["cpu"], files["cuda"], strict=True):
        _close(b, a)
    assert main(["resize", base_path, lora_path, "-r", "spn_lora,thr=-0.95", "-o",
                 str(tmp_path / "cli"), "-d", "cuda"]) == 0


def test_cli_extract_on_the_device_writes_the_cpu_file(emulated_gpu, files, tmp_path) -> None:
    out = {}
    for dev in ("cpu", "cuda"):
        path = str(tmp_path / f"{dev}.safetensors")
        assert main(["extract", *files, "-o", path, "--device", dev, "--rank", "6"]) == 0
        out[dev] = load_file(path)
    _close(out["cuda"], out["cpu"])


@pytest.mark.parametrize("command", ["extract", "validate", "resize"])
def test_cuda_without_a_gpu_is_a_one_line_error(files, tmp_path, capsys, command) -> None:
    assert not torch.cuda.is_available()
    lora = str(tmp_path / "l.safetensors")
    save_file({"diffusion_model.x.lora_up.weight": torch.zeros(2, 1),
               "diffusion_model.x.lora_down.weight": torch.zeros(1, 2)}, lora)
    argv = {"extract": ["extract", *files, "-o", str(tmp_path / "o.safetensors"), "--device", "cuda"],
            "validate": ["validate", *files, lora, "--device", "cuda"],
            "resize": ["resize", files[0], lora, "-r", "spn_lora,thr=-1", "-o", str(tmp_path / "r"),
                       "-d", "cuda"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-extract: error:") and "CUDA is not available" in err
    assert "\n" not in err and "Traceback" not in err
    assert not os.path.exists(str(tmp_path / "o.safetensors"))
