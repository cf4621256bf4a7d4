"""DoRA output of extraction, against ComfyUI's DoRA formula as the resizer computes it.

Oracle: ``resize.adapters.dense_change`` (ComfyUI's ``weight_decompose`` re-written for the
resizer and proven against the real ComfyUI in ``integration/test_comfy_adapters.py``), applied
to the tensors we write. The real ComfyUI's own loader is run on our files in
``integration/test_comfy_dora.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.dora import extract_dora_matrix, same_size_rank
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.extract.layer import extract_matrix
from lora_extract.extract.synthetic import LayerSpec, make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from lora_extract.resize.adapters import DenseModule, dense_change
from tests.support.diffusers_flux_model import flux_pair, flux_shapes

SHAPES = [(48, 32), (40, 40), (24, 8, 3, 3), (32, 12, 1, 2, 2)]


def _oracle_weight(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float,
                   scale: torch.Tensor) -> torch.Tensor:
    """ComfyUI's patched weight for one layer's stored tensors, by the resizer's code.

    The factors go in upcast, as ComfyUI multiplies them (in float32, not in the stored dtype).
    """
    sd = {"p.lora_up.weight": up.float(), "p.lora_down.weight": down.float(), "p.dora_scale": scale}
    m = DenseModule("p", "lora", {"lora_up": "p.lora_up.weight", "lora_down": "p.lora_down.weight"},
                    alpha, "p.dora_scale")
    return w.float() + dense_change(m, sd.__getitem__, tuple(w.shape), lambda: w.float())


def _finetune(shape, gen, row_scale: float = 0.05, rank: int = 3, noise: float = 0.003):
    """A base weight and a fine-tune: per-output rescale + low-rank change + dense noise."""
    w = torch.randn(*shape, generator=gen)
    mat = w.reshape(shape[0], -1)
    c = 1 + row_scale * torch.randn(shape[0], 1, generator=gen)
    low = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, mat.shape[1], generator=gen)
    t = mat * c + 0.05 * low + noise * torch.randn(mat.shape, generator=gen)
    return w, t.reshape(shape)


def _rel(a: torch.Tensor, b: torch.Tensor, fro: float) -> float:
    return float((a.double() - b.double()).norm()) / fro


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,clamp", [("fp32", None), ("fp16", 0.99), ("bf16", None)])
def test_reported_error_is_the_error_of_comfyuis_formula(axis, shape, dtype, clamp, gen) -> None:
    w, t = _finetune(shape, gen)
    cfg = ExtractConfig(rank=4, output_dtype=dtype, clamp_quantile=clamp)
    diff = t - w
    fro = float(diff.double().norm())
    ex = extract_dora_matrix(diff.clone(), w, cfg, axis)
    f = ex.factors
    assert ex.dora is not None and ex.dora.axis == axis
    tail = (1,) * (len(shape) - 2)
    want = (shape[0], 1, *tail) if axis == "output" else (1, shape[1], *tail)
    assert tuple(ex.dora.scale.shape) == want and ex.dora.scale.dtype == torch.float32
    assert f.up.dtype == cfg.torch_dtype and tuple(f.down.shape) == (4, *shape[1:])
    patched = _oracle_weight(w, f.up, f.down, f.alpha, ex.dora.scale)
    assert ex.rel_error == pytest.approx(_rel(patched, t, fro), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_axis_reproduces_a_rescale_plus_low_rank_finetune(shape, gen) -> None:
    # ComfyUI's output axis makes W' = m/||W_i|| (W + D): exactly a row rescale of W + rank r.
    w, t = _finetune(shape, gen, row_scale=0.1, noise=0.0)
    cfg = ExtractConfig(rank=3, output_dtype="fp32", clamp_quantile=None)
    ex = extract_dora_matrix((t - w).clone(), w, cfg, "output")
    plain = extract_matrix((t - w).clone(), cfg)
    assert ex.rel_error < 1e-3          # the alternation's 12 steps (exact in the limit)
    assert plain.rel_error > 0.3        # the rescale is full rank: plain LoRA cannot carry it


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_axis_reproduces_a_dora_trained_finetune(shape, gen) -> None:
    # A DoRA fine-tune on the input axis: direction W + L (rank 3), new per-channel lengths.
    w = torch.randn(*shape, generator=gen)
    mat = w.reshape(shape[0], -1)
    low = 0.05 * torch.randn(shape[0], 3, generator=gen) @ torch.randn(3, mat.shape[1], generator=gen)
    v = (mat + low).reshape(shape)
    col = v.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
    lengths = col * (1 + 0.1 * torch.rand(shape[1], generator=gen))
    t = (v.transpose(0, 1) * (lengths / col).reshape(-1, *[1] * (len(shape) - 1))).transpose(0, 1)
    cfg = ExtractConfig(rank=3, output_dtype="fp32", clamp_quantile=None)
    ex = extract_dora_matrix((t - w).clone(), w, cfg, "input")
    plain = extract_matrix((t - w).clone(), cfg)
    assert ex.rel_error < 2e-3
    assert plain.rel_error > 0.2


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_plain_lora_of_the_same_rank(axis, seed) -> None:
    # The alternation starts at the plain LoRA and only descends (see extract/dora.py), also on
    # a fine-tune with no rescale at all.
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[seed]
    w, t = _finetune(shape, g, row_scale=0.02 * seed, noise=0.01)
    cfg = ExtractConfig(rank=2 + seed, output_dtype="fp32", clamp_quantile=None)
    ex = extract_dora_matrix((t - w).clone(), w, cfg, axis)
    plain = extract_matrix((t - w).clone(), cfg)
    assert ex.rel_error <= plain.rel_error * (1 + 1e-5)


def test_plain_lora_in_the_same_bytes() -> None:
    cfg16 = ExtractConfig(rank=8, output_dtype="fp16")
    cfg32 = ExtractConfig(rank=8, output_dtype="fp32")
    from lora_extract.extract.dora import _Axis
    # fp16, 320x320: 320 float32 magnitudes = 1280 bytes = exactly one rank (2 * 640 bytes).
    assert same_size_rank(8, _Axis("output", 320, 320, 1), cfg16, 320) == 9
    # output axis of a wide layer: 320 * 4 bytes < one rank of (320 + 1280) * 2 bytes.
    assert same_size_rank(8, _Axis("output", 320, 1280, 1), cfg16, 320) == 8
    assert same_size_rank(8, _Axis("input", 320, 1280, 1), cfg16, 320) == 9
    assert same_size_rank(8, _Axis("output", 320, 320, 1), cfg32, 320) == 8
    assert same_size_rank(8, _Axis("output", 320, 320, 1), cfg16, 8) == 8    # capped by the matrix


def test_same_size_error_is_a_plain_extraction_at_that_rank(gen) -> None:
    w, t = _finetune((40, 40), gen)
    cfg = ExtractConfig(rank=4, output_dtype="fp16")
    ex = extract_dora_matrix((t - w).clone(), w, cfg, "output")
    assert ex.dora is not None and ex.dora.lora_rank == 5
    plain = extract_matrix((t - w).clone(), ExtractConfig(rank=5, output_dtype="fp16"))
    assert ex.dora.lora_rel_error == pytest.approx(plain.rel_error, rel=1e-6)


def test_one_output_layer_uses_the_output_axis(gen) -> None:
    # ComfyUI reads a [1, in] magnitude of a one-output weight as an output-axis one.
    w, t = _finetune((1, 16), gen, rank=1)
    ex = extract_dora_matrix((t - w).clone(), w, ExtractConfig(rank=1, output_dtype="fp32"), "input")
    assert ex.dora is not None and ex.dora.axis == "output"
    patched = _oracle_weight(w, ex.factors.up, ex.factors.down, ex.factors.alpha, ex.dora.scale)
    assert ex.rel_error == pytest.approx(_rel(patched, t, float((t - w).norm())), rel=1e-4, abs=1e-6)


def _layers() -> list[LayerSpec]:
    return [
        LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.weight", (24, 24, 3, 3), 8),
        LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.bias", (24,), 1),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (32, 32), 8),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (96, 32), 8),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", (32, 48), 8),
        LayerSpec("diffusion_model.middle_block.1.proj_out.weight", (32, 32), 0),
    ]


def _check_file(tensors, report, base, tuned, prefix_of) -> int:
    """Every LoRA layer of the file patches its base weight to the error its report states."""
    checked = 0
    for r in report.layers:
        if r.status != "lora":
            continue
        p = prefix_of(r.key)
        up, down = tensors[p + ".lora_up.weight"], tensors[p + ".lora_down.weight"]
        w, t = base[r.key].float(), tuned[r.key].float()
        patched = _oracle_weight(w, up, down, float(tensors[p + ".alpha"]), tensors[p + ".dora_scale"])
        assert r.rel_error == pytest.approx(_rel(patched, t, float((t - w).double().norm())),
                                            rel=1e-4, abs=1e-6), r.key
        assert r.lora_same_size_error is not None and r.lora_same_size_rank is not None
        checked += 1
    return checked


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_v1_file_patches_to_the_reported_error(axis, style) -> None:
    base, tuned = make_pair(_layers(), seed=5)
    cfg = ExtractConfig(rank=4, dora=axis, key_style=style)
    res = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg)

    def prefix_of(key: str) -> str:
        module = key[len("diffusion_model."):-len(".weight")]
        return "lora_unet_" + module.replace(".", "_") if style == "kohya" else "diffusion_model." + module

    assert _check_file(res.tensors, res.report, base, tuned, prefix_of) == 4
    assert sum(k.endswith(".dora_scale") for k in res.tensors) == 4
    assert res.metadata["lora_extract.dora"] == f'"{axis}"'
    text = res.report.format_text()
    assert f"DoRA ({axis} axis): mean error" in text and "plain LoRA in the same bytes" in text
    # The file's bytes include the float32 magnitudes.
    mags = sum(t.numel() * 4 for k, t in res.tensors.items() if k.endswith(".dora_scale"))
    assert mags == (24 + 32 + 96 + 32 if axis == "output" else 24 + 32 + 32 + 48) * 4


def test_diffusers_style_carries_dora_scale_with_a_note() -> None:
    base, tuned = flux_pair(flux_shapes(), seed=2)
    cfg = ExtractConfig(rank=4, dora="output", key_style="diffusers", output_dtype="fp32")
    res = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg)
    scales = [k for k in res.tensors if k.endswith(".dora_scale")]
    downs = [k for k in res.tensors if k.endswith(".lora_A.weight")]
    assert scales and len(scales) == len(downs)
    assert {k[:-len(".dora_scale")] for k in scales} == {k[:-len(".lora_A.weight")] for k in downs}
    assert any("lora_magnitude_vector" in n for n in res.report.notes)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_v2_writes_v1s_dora_file(axis) -> None:
    base, tuned = make_pair(_layers(), seed=6)
    cfg = ExtractConfig(rank=4, dora=axis)
    v1 = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg)
    for opts in (MemoryOptions(), MemoryOptions(mode="maximum", batch_size=4)):
        v2 = extract_lora_streamed(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg, opts,
                             cache=ResidentCache(), batched_svd=True).result
        assert list(v2.tensors) == list(v1.tensors)
        for k, t in v1.tensors.items():
            torch.testing.assert_close(v2.tensors[k].float(), t.float(), rtol=2e-3, atol=2e-4, msg=k)
        e1 = {r.key: (r.rank, r.dora_axis, r.lora_same_size_rank) for r in v1.report.layers}
        assert e1 == {r.key: (r.rank, r.dora_axis, r.lora_same_size_rank) for r in v2.report.layers}


@pytest.mark.parametrize("kwargs,match", [
    ({"dora": "rows"}, "dora 'rows' is not one of off, output, input"),
    ({"dora": "output", "lora_type": "full"}, "cannot be combined with lora_type 'full'"),
    ({"dora": "input", "target_size_mb": 4.0}, "cannot be combined with target_size_mb 4"),
])
def test_bad_dora_settings_are_clear_errors(kwargs, match) -> None:
    with pytest.raises(ExtractionInputError, match=match):
        ExtractConfig(**kwargs).validate()


def test_output_names_say_dora() -> None:
    assert ExtractConfig(rank=8, dora="input").name_tag() == "rank_8_dora_input"
    assert ExtractConfig(rank=8).name_tag() == "rank_8"
    assert math.isfinite(ExtractConfig().rank)


@pytest.mark.parametrize("node_id", ["LoraExtract", "LoraExtractV2"])
def test_nodes_offer_dora_last_and_off_by_default(node_id) -> None:
    from lora_extract.nodes import NODE_CLASS_MAPPINGS

    optional = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]
    kind, opts = optional["dora"]
    assert kind == "COMBO" and opts["options"] == ["off", "output", "input"]
    assert opts["default"] == "off"
    names = list(optional)   # saved workflows keep their widget values: only later inputs follow
    assert names[names.index("dora") + 1:] == ["layer_preset", "include", "exclude",
                                               "min_change_rel", "min_change_abs", "new_tensors"]


def test_command_line_writes_a_dora_file(tmp_path) -> None:
    from safetensors.torch import load_file

    from lora_extract.cli import main
    from lora_extract.extract.synthetic import write_pair

    bp, tp = write_pair(str(tmp_path), _layers(), seed=7)
    out = str(tmp_path / "dora.safetensors")
    assert main(["extract", bp, tp, "-o", out, "--rank", "4", "--dora", "input"]) == 0
    sd = load_file(out)
    assert sorted(tuple(t.shape) for k, t in sd.items() if k.endswith(".dora_scale")) == [
        (1, 24, 1, 1), (1, 32), (1, 32), (1, 48)]
    with pytest.raises(SystemExit):
        main(["extract", bp, tp, "-o", str(tmp_path / "x.safetensors"), "--dora", "rows"])
