"""Every option a user turns changes what the user gets: the file's dtypes, keys, alpha and
metadata, the randomized SVD's accuracy, the validate exit status, V2's memory bound and
cache, ComfyUI's memory request and the node's live status text.

Each test checks the output itself (the file, the exit status, the ComfyUI call), never only
the report; each was checked to fail when the line it guards is broken (see CONTRIBUTING.md,
"Stub fidelity").
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import comfy.model_management as mm
import comfy.utils
import pytest
import torch
from execution import run_node
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from server import PromptServer

from lora_extract.cli import main
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.layer import extract_matrix
from lora_extract.extract.synthetic import LayerSpec, make_pair, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.rolling import stream_rolling
from lora_extract.memory.streamed_extract import extract_lora_streamed
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from lora_extract.nodes.comfy_adapter import ComfyModelSource
from tests.support.comfy_keymap import LORA_KEY_FORMATS, apply_lora
from tests.support.helpers import matrix_with_spectrum, optimal_rel_error, patched_pair

NODE_DEFAULTS = dict(filename_prefix="loras/opt", rank=8, lora_type="standard",
                     algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp16", bias_diff=True,
                     adaptive_param=0.15, clamp_quantile=False)
GIB = 2**30


@pytest.fixture
def models():
    return patched_pair(width=32, seed=21)


def _node(name: str, node_id: str = "7", **inputs):
    return run_node(NODE_CLASS_MAPPINGS[name], {**NODE_DEFAULTS, **inputs}, node_id=node_id)


# --- output dtype -------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
@pytest.mark.parametrize("output_dtype,expected", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                   ("fp32", torch.float32)])
def test_every_stored_tensor_has_the_chosen_dtype(comfy_dirs, models, node: str, output_dtype: str,
                                                  expected: torch.dtype) -> None:
    _base, _tuned, patcher, tuned_patcher = models
    path = _node(node, finetuned_model=tuned_patcher, original_model=patcher,
                 output_dtype=output_dtype)["result"][0]
    lora = load_file(path)
    factors = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    assert any(k.endswith(".lora_up.weight") for k in factors)
    assert any(k.endswith((".diff", ".diff_b")) for k in factors)
    assert {k: v.dtype for k, v in factors.items()} == {k: expected for k in factors}
    # alpha stays a float32 scalar, as ComfyUI and kohya write it
    assert {v.dtype for k, v in lora.items() if k.endswith(".alpha")} == {torch.float32}


# --- lowrank_iters ------------------------------------------------------------------------------

def _slow_spectrum_matrix(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.arange(1, 161, dtype=torch.float64) ** -0.3   # slowly decaying: iterations matter
    return matrix_with_spectrum(200, 160, sigma, g)


def _lowrank_cfg(iters: int) -> ExtractConfig:
    return ExtractConfig(rank=8, algorithm="svd_lowrank", lowrank_iters=iters, output_dtype="fp32",
                         clamp_quantile=None, oversample=4)


def _ratios_v1(mats: list[torch.Tensor], iters: int) -> list[float]:
    """rel. error / optimal rank-8 error of each matrix, through V1's per-layer path."""
    return [extract_matrix(a.clone(), _lowrank_cfg(iters), generator=torch.Generator().manual_seed(3)).rel_error
            / optimal_rel_error(a, 8) for a in mats]


def _ratios_v2(mats: list[torch.Tensor], iters: int) -> list[float]:
    """The same through V2's batched SVD: both layers in one batch (no read-ahead: the batch may
    hold two layers), one SVD call."""
    keys = [f"diffusion_model.blocks.{i}.proj.weight" for i in range(len(mats))]
    base = StateDictSource({k: torch.zeros_like(a) for k, a in zip(keys, mats, strict=True)})
    tuned = StateDictSource({k: a.clone() for k, a in zip(keys, mats, strict=True)})
    out = extract_lora_streamed(base, tuned, _lowrank_cfg(iters), MemoryOptions(mode="balanced", batch_size=2, prefetch_ahead=0),
                          cache=ResidentCache(), batched_svd=True).result
    ratios = []
    for k, a in zip(keys, mats, strict=True):
        rec = out.tensors[k[:-7] + ".lora_up.weight"] @ out.tensors[k[:-7] + ".lora_down.weight"]
        err = float((rec.double() - a.double()).norm() / a.double().norm())
        ratios.append(err / optimal_rel_error(a, 8))
    return ratios


@pytest.mark.parametrize("ratios", [_ratios_v1, _ratios_v2], ids=["v1", "v2_batched"])
def test_lowrank_iters_buys_accuracy(ratios) -> None:
    """Power iterations close the gap to the optimal rank-8 error on a slowly decaying
    spectrum: 1 iteration is measurably worse than 8, and 8 is near optimal.

    (The Rayleigh-Ritz step over the last bases together brought 1 iteration from ~1.02x to
    ~1.009x the optimum; 8 are within the product's 1.001x.)"""
    mats = [_slow_spectrum_matrix(s) for s in (1, 2)]
    by_iters = {it: ratios(mats, it) for it in (1, 8)}
    for one, eight in zip(by_iters[1], by_iters[8], strict=True):
        assert eight < 1.001, by_iters
        assert one > eight + 0.005 and one - 1 > 10 * (eight - 1), by_iters


# --- key_style, alpha, bias_diff, ss_network_alpha ----------------------------------------------

@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
def test_kohya_keys_alpha_and_no_diffs(comfy_dirs, models, node: str) -> None:
    base, tuned, patcher, tuned_patcher = models
    path = _node(node, finetuned_model=tuned_patcher, original_model=patcher, rank=8, alpha=4.0,
                 key_style="kohya", bias_diff=False, output_dtype="fp32")["result"][0]
    lora = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    matrices = [k for k, v in base.items() if k.endswith(".weight") and v.dim() >= 2]
    expected_prefixes = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                         for k in matrices if not torch.equal(base[k], tuned[k])}
    prefixes = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in lora}
    assert prefixes == expected_prefixes                       # kohya names, nothing else
    assert not [k for k in lora if k.endswith((".diff", ".diff_b"))]
    alphas = {k: float(v) for k, v in lora.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {4.0}
    assert meta["ss_network_alpha"] == "4"
    assert meta["ss_network_dim"] == "8"
    # What a loader gets: alpha/rank = 4/8 scales the factors, and the weights come out right.
    patched, unloaded = apply_lora(base, lora)
    assert unloaded == set()
    for k in matrices:
        d = float((tuned[k] - base[k]).norm())
        if d:
            assert float((patched[k] - tuned[k]).norm()) / d < 0.2, k


# --- validate --max-error -----------------------------------------------------------------------

VALIDATE_LAYERS = [
    LayerSpec("diffusion_model.input_blocks.1.1.proj_in.weight", (16, 16), 4),
    LayerSpec("diffusion_model.middle_block.1.proj_out.weight", (16, 16), 4),
]


@pytest.fixture
def validate_files(tmp_path):
    bp, tp = write_pair(str(tmp_path), VALIDATE_LAYERS, seed=2)
    lora = str(tmp_path / "good.safetensors")
    assert main(["extract", bp, tp, "-o", lora, "--rank", "16", "--dtype", "fp32", "--no-clamp"]) == 0
    return tmp_path, bp, tp, load_file(lora)


def _validate_exit(tmp_path, bp: str, tp: str, lora: dict[str, torch.Tensor], name: str) -> int:
    path = str(tmp_path / f"{name}.safetensors")
    save_file(lora, path)
    return main(["validate", bp, tp, path, "--max-error", "1e9"])   # the error limit never trips


def test_max_error_passes_a_complete_lora(validate_files) -> None:
    tmp_path, bp, tp, good = validate_files
    assert _validate_exit(tmp_path, bp, tp, good, "ok") == 0


def test_max_error_fails_on_an_uncovered_layer(validate_files, capsys) -> None:
    tmp_path, bp, tp, good = validate_files
    dropped = {k: v for k, v in good.items() if "middle_block" not in k}
    assert _validate_exit(tmp_path, bp, tp, dropped, "uncovered") == 1
    assert '"uncovered": 1' in capsys.readouterr().err


def test_max_error_fails_on_an_unmatched_key(validate_files, capsys) -> None:
    tmp_path, bp, tp, good = validate_files
    extra = dict(good, **{"diffusion_model.nowhere.lora_up.weight": torch.zeros(16, 2),
                          "diffusion_model.nowhere.lora_down.weight": torch.zeros(2, 16)})
    assert _validate_exit(tmp_path, bp, tp, extra, "unmatched") == 1
    assert '"unmatched_keys": 2' in capsys.readouterr().err


def test_max_error_fails_on_an_unmergeable_patch(validate_files, capsys) -> None:
    tmp_path, bp, tp, good = validate_files
    prefix = "diffusion_model.middle_block.1.proj_out"
    bad = dict(good)
    rank = bad[f"{prefix}.lora_up.weight"].shape[1]
    bad[f"{prefix}.lora_up.weight"] = torch.zeros(15, rank)     # 15 x 16 does not fit 16 x 16
    assert _validate_exit(tmp_path, bp, tp, bad, "unmergeable") == 1
    assert '"not_merged": 1' in capsys.readouterr().err


# --- V2 rolling window --------------------------------------------------------------------------

class _Layer:
    def __init__(self, n: int) -> None:
        self.n = n

    def release(self) -> None:
        pass


class _Batch:
    def __init__(self, layers) -> None:
        self.layers = layers


@pytest.mark.parametrize("window", [1, 3])
def test_rolling_window_bounds_layers_held_while_workers_are_busy(window: int) -> None:
    """Workers that do not finish (held on an event) must not let the main thread load more
    than ``window`` layers: it waits for the oldest instead. The event opens when the
    (window+1)-th layer is submitted, the first moment the bound has to act."""
    layers = [_Layer(i) for i in range(12)]
    go = threading.Event()
    held: list[int] = []
    stored: list[int] = []
    submitted = 0

    def extract_one(layer):
        assert go.wait(timeout=60), "workers were never released"
        return layer.n

    def needs_svd(layer) -> bool:
        nonlocal submitted
        held.append(submitted - len(stored))      # layers loaded and not yet stored
        submitted += 1
        if submitted == window + 1:
            go.set()
        return True

    def store(layer, ex) -> None:
        assert ex == layer.n
        stored.append(layer.n)

    with ThreadPoolExecutor(4) as workers:
        stream_rolling(iter([_Batch(layers)]), lambda: True, workers, window, extract_one,
                       needs_svd, store, lambda n, s: None, None)
    assert stored == list(range(12))
    assert max(held) == window


# --- V2 resident cache after add_patches --------------------------------------------------------

def test_resident_cache_misses_after_add_patches(comfy_dirs, models) -> None:
    """An upstream LoRA added to the same MODEL (ComfyUI bumps ``patches_uuid``) must not be
    answered from the differences kept from the previous run."""
    base, tuned, patcher, tuned_patcher = models
    cache = ResidentCache()
    cfg = ExtractConfig(rank=8, output_dtype="fp32", clamp_quantile=None)
    opts = MemoryOptions(mode="maximum", blocks_in_gpu=40)
    probe = lambda: (8 * GIB, 16 * GIB)  # noqa: E731 - a device with room, on the CPU

    def run():
        return extract_lora_streamed(ComfyModelSource(patcher, "original_model"),
                               ComfyModelSource(tuned_patcher, "finetuned_model"), cfg, opts,
                               probe=probe, cache=cache)
    first = run()
    assert first.memory.cached_layers > 0
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    extra = torch.zeros_like(base[key])
    extra[:, :3] = 0.5                                      # a rank-1 upstream change
    tuned_patcher.add_patches({key: (extra,)})
    second = run()
    fresh = extract_lora(ComfyModelSource(patcher, "o"), ComfyModelSource(tuned_patcher, "t"), cfg)
    prefix = key[:-len(".weight")]
    for k in (f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"):
        torch.testing.assert_close(second.result.tensors[k], fresh.tensors[k], rtol=1e-4, atol=1e-5)
    up, down = second.result.tensors[f"{prefix}.lora_up.weight"], second.result.tensors[f"{prefix}.lora_down.weight"]
    first_up = first.result.tensors[f"{prefix}.lora_up.weight"]
    first_down = first.result.tensors[f"{prefix}.lora_down.weight"]
    assert float((up @ down - first_up @ first_down).norm()) > 0.1 * float(extra.norm())


# --- free_memory on an accelerator --------------------------------------------------------------

class _StopBeforeTensorWork(Exception):
    pass


def _on_fake_cuda(monkeypatch, stop_at_call: int) -> list[tuple[float, torch.device]]:
    """With the ``comfy_on_gpu`` fixture (the stub's CUDA compute device on the emulated GPU,
    24 GiB): ``free_memory`` calls are recorded and the ``stop_at_call``-th raises, before any
    layer's tensor work."""
    calls: list[tuple[float, torch.device]] = []
    real = mm.free_memory

    def free_memory(memory_required, device, keep_loaded=None):
        calls.append((memory_required, device))
        real(memory_required, device, keep_loaded)
        if len(calls) == stop_at_call:
            raise _StopBeforeTensorWork
    monkeypatch.setattr(mm, "free_memory", free_memory)
    return calls


def test_v1_node_asks_comfy_for_room_for_its_largest_layer(comfy_on_gpu, comfy_dirs, models, monkeypatch) -> None:
    base, _tuned, patcher, tuned_patcher = models
    calls = _on_fake_cuda(monkeypatch, stop_at_call=1)
    with pytest.raises(_StopBeforeTensorWork):
        _node("LoraExtract", finetuned_model=tuned_patcher, original_model=patcher)
    largest = max(math.prod(v.shape) for v in base.values())
    # The float32 difference, both factors and the SVD workspace: 4 float32 copies.
    assert calls == [(largest * 4 * 4, torch.device("cuda", 0))]


def test_v2_node_asks_comfy_for_its_plan(comfy_on_gpu, comfy_dirs, models, monkeypatch) -> None:
    base, _tuned, patcher, tuned_patcher = models
    monkeypatch.setattr("lora_extract.memory.cache.RESIDENT", ResidentCache())
    assert mm.get_total_memory(mm.get_torch_device()) == 24 * GIB   # the emulated GPU's
    calls = _on_fake_cuda(monkeypatch, stop_at_call=2)
    with pytest.raises(_StopBeforeTensorWork):
        _node("LoraExtractV2", finetuned_model=tuned_patcher, original_model=patcher,
              vram_usage_mode="maximum", blocks_in_gpu=40)
    largest = max(math.prod(v.shape) for v in base.values())
    assert calls[0] == (largest * 4 * 4, torch.device("cuda", 0))
    size, device = calls[1]
    assert device == torch.device("cuda", 0)
    # Every block fits in 24 GiB, so the plan asks for all of them (float32 pairs) and no more
    # than the device has.
    pairs = sum(2 * 4 * v.numel() for v in base.values())
    assert pairs <= size <= 24 * GIB


# --- live status text ---------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
def test_progress_text_goes_to_the_running_node(comfy_dirs, models, node: str) -> None:
    base, _tuned, patcher, tuned_patcher = models
    server = PromptServer._reset()
    comfy.utils._reset()
    _node(node, node_id="42", finetuned_model=tuned_patcher, original_model=patcher)
    texts = server.progress_texts()
    n = len(base)
    assert [t for nid, t in texts if nid == "42"] and {nid for nid, _ in texts} == {"42"}
    assert texts[-1][1].startswith(f"layer {n}/{n}: ")
    # The progress bar's messages carry the node id too (ComfyUI's hook adds it).
    events = server.progress_events()
    assert [e["value"] for e in events] == list(range(1, n + 1))
    assert {e["node"] for e in events} == {"42"}


def _extract_file(tuned_patcher, patcher) -> str:
    return _node("LoraExtract", finetuned_model=tuned_patcher, original_model=patcher,
                 output_dtype="fp32")["result"][0]


def test_validate_node_asks_comfy_for_room_on_cuda(comfy_on_gpu, comfy_dirs, models, monkeypatch) -> None:
    base, _tuned, patcher, tuned_patcher = models
    path = _extract_file(tuned_patcher, patcher)
    calls = _on_fake_cuda(monkeypatch, stop_at_call=1)
    with pytest.raises(_StopBeforeTensorWork):
        run_node(NODE_CLASS_MAPPINGS["LoraValidate"], dict(
            finetuned_model=tuned_patcher, original_model=patcher, lora_name="", lora_path=path))
    largest = max(math.prod(v.shape) for v in base.values())
    # base, tuned, difference and patched weight of the largest layer, and the LoRA's product
    assert calls == [(largest * 4 * 5, torch.device("cuda", 0))]


def test_validate_node_sends_progress_text_to_its_node(comfy_dirs, models) -> None:
    base, _tuned, patcher, tuned_patcher = models
    path = _extract_file(tuned_patcher, patcher)
    server = PromptServer._reset()
    run_node(NODE_CLASS_MAPPINGS["LoraValidate"], dict(
        finetuned_model=tuned_patcher, original_model=patcher, lora_name="", lora_path=path), node_id="9")
    texts = server.progress_texts()
    n = len(base)
    assert texts and {nid for nid, _ in texts} == {"9"}
    assert texts[-1][1].startswith(f"validating layer {n}/{n}: ")


def test_config_defaults_are_the_documented_node_defaults() -> None:
    """The library's defaults are the node's: clamping at the 0.99 quantile is on."""
    key = "diffusion_model.blocks.0.proj.weight"
    base, tuned = make_pair([LayerSpec(key, (320, 256), 12)], seed=7)
    # One entry far out: its singular vector is nearly one-hot, so the per-vector clamp (2x the
    # 0.99 quantile of each factor vector) has entries to clip.
    tuned[key] = tuned[key].clone()
    tuned[key][3, 5] += 0.3 * (tuned[key] - base[key]).norm()
    b, t = StateDictSource(base), StateDictSource(tuned)
    default = extract_lora(b, t, ExtractConfig(rank=8))
    explicit = extract_lora(b, t, ExtractConfig(rank=8, clamp_quantile=0.99))
    unclamped = extract_lora(b, t, ExtractConfig(rank=8, clamp_quantile=None))
    for k in default.tensors:
        assert torch.equal(default.tensors[k], explicit.tensors[k]), k
    assert any(not torch.equal(default.tensors[k], unclamped.tensors[k]) for k in default.tensors)
    assert default.report.layers[0].clamped_entries > 0 == unclamped.report.layers[0].clamped_entries


def test_config_cannot_change_during_a_run() -> None:
    import dataclasses

    cfg = ExtractConfig(rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4  # type: ignore[misc]
    assert hash(cfg) == hash(ExtractConfig(rank=8))


@pytest.mark.parametrize("fmt", LORA_KEY_FORMATS, ids=lambda f: f[0])
def test_validate_reads_every_lora_format_comfyui_reads(validate_files, fmt) -> None:
    """A LoRA written with any up/down suffix pair ComfyUI's adapter accepts is validated as
    complete. The formats come from tests/support/comfy_keymap.py (ComfyUI's list, written out
    independently), so a format dropped from the pack's list leaves its layers unmatched."""
    tmp_path, bp, tp, good = validate_files
    up, down, _mid = fmt
    renamed = {}
    for k, v in good.items():
        if k.endswith(".lora_up.weight"):
            renamed[k[: -len(".lora_up.weight")] + up] = v
        elif k.endswith(".lora_down.weight"):
            renamed[k[: -len(".lora_down.weight")] + down] = v
        else:
            renamed[k] = v
    assert _validate_exit(tmp_path, bp, tp, renamed, "fmt") == 0
