"""The quantization noise floor on the report chart and in the node's summary lines."""

from __future__ import annotations

import numpy as np
import torch

from lora_extract.charts import ChartLayer, extraction_chart, render_report_chart, to_array
from lora_extract.charts.canvas import Axis, Box, x_span
from lora_extract.charts.layer_chart import ERROR_FLOOR, NOISE_COLOR
from lora_extract.charts.report_chart import MARGIN_LEFT, MARGIN_RIGHT
from lora_extract.charts.rows import rows_from_extraction
from lora_extract.extract.config import ExtractConfig
from lora_extract.extract.formats.dispatch import open_source
from lora_extract.extract.pipeline import extract_lora
from lora_extract.extract.report import STATUS_SKIPPED
from lora_extract.nodes.summary_lines import extraction_key_lines
from tests.support.quant_files import write_scaled_fp8

W, H = 1200, 760


def _noise_pixels(arr: np.ndarray) -> np.ndarray:
    px = np.round(arr * 255).astype(int)
    return (px == np.array(NOISE_COLOR)).all(axis=-1)


def test_chart_draws_each_floor_at_its_height_and_marks_noise_level_layers() -> None:
    rows = [ChartLayer("diffusion_model.a.weight", "a", 8, 0.05, "lora", 0.2, False),
            ChartLayer("diffusion_model.b.weight", "b", 8, 0.5, "lora", 0.9, True),
            ChartLayer("diffusion_model.c.weight", "c", 8, 0.05, "lora")]
    mask = _noise_pixels(to_array(render_report_chart(rows, [], "t", "", W, H)))
    err_box = Box(MARGIN_LEFT, int(H * 0.35), W - MARGIN_RIGHT, int(H * 0.60))
    axis = Axis(ERROR_FLOOR, 1.0, log=True)  # the panel's axis: max(1, 1.2 * worst error)
    for i, (floor, marked) in enumerate(((0.2, False), (0.9, True), (None, False))):
        x0, x1 = x_span(err_box, i, 3)
        col = mask[:, (x0 + x1) // 2]
        if floor is None:
            assert not col.any()
            continue
        ys = np.flatnonzero(col[: err_box.bottom])
        assert ys.size and abs(int(ys.max()) - axis.y(err_box, floor)) <= 1, (i, ys)
        under = col[err_box.bottom + 1: err_box.bottom + 4]
        assert under.all() == marked and under.any() == marked


def test_no_floor_no_purple() -> None:
    rows = [ChartLayer("diffusion_model.a.weight", "a", 8, 0.05, "lora")]
    assert not _noise_pixels(to_array(render_report_chart(rows, [], "t", "", W, H))).any()


def _fp8_pair(tmp_path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.w.weight": torch.randn(64, 48, generator=g) * 0.05 for i in range(3)}
    tuned = dict(base)
    # blocks.0: changed far below the fp8 step (noise); the others: a clear low-rank change.
    tuned["blocks.0.w.weight"] = base["blocks.0.w.weight"] + 1e-5 * torch.randn(64, 48, generator=g)
    for i in (1, 2):
        k = f"blocks.{i}.w.weight"
        tuned[k] = base[k] + torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g) * 0.02
    paths = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")
    write_scaled_fp8(paths[0], base, {})
    write_scaled_fp8(paths[1], tuned, {})
    return paths


def test_rows_and_summary_lines_carry_the_floor(tmp_path) -> None:
    b, t = _fp8_pair(tmp_path)
    cfg = ExtractConfig(rank=4, output_dtype="fp32", clamp_quantile=None)
    report = extract_lora(open_source(b), open_source(t), cfg).report
    assert report is not None
    rows = {r.key: r for r in rows_from_extraction(report)}
    layers = {r.key: r for r in report.layers}
    for k, row in rows.items():
        assert row.noise_floor == layers[k].noise_floor and row.noise_floor is not None
        assert row.at_noise_level == layers[k].at_noise_level
    assert rows["blocks.0.w.weight"].at_noise_level
    s = report.summary()
    lines = extraction_key_lines(report, "x.safetensors")
    want = (f"quantization noise floor: median {100 * s.median_noise_floor:.1f}%; "
            "1 layers at the noise level")
    assert want in lines and lines[-1].startswith("skipped:")
    # The chart's subtitle says it, and the floors are drawn.
    assert _noise_pixels(to_array(extraction_chart(report))).any()

    skipped = extract_lora(open_source(b), open_source(t),
                           ExtractConfig(rank=4, output_dtype="fp32", clamp_quantile=None,
                                         skip_noise_layers=True)).report
    assert skipped is not None
    (left,) = [r for r in skipped.layers if r.at_noise_level]
    assert left.status == STATUS_SKIPPED
    assert any(line.endswith("1 layers at the noise level (1 left out)")
               for line in extraction_key_lines(skipped, "x.safetensors"))


def test_unquantized_inputs_add_no_line(tmp_path) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 32, generator=g)
    save_file({"a.weight": w}, str(tmp_path / "b.safetensors"))
    save_file({"a.weight": w + 0.1 * torch.randn(32, 32, generator=g)}, str(tmp_path / "t.safetensors"))
    report = extract_lora(open_source(str(tmp_path / "b.safetensors")),
                          open_source(str(tmp_path / "t.safetensors")), ExtractConfig(rank=4)).report
    assert report is not None
    lines = extraction_key_lines(report, "x.safetensors")
    assert len(lines) == 5 and not any("noise" in line for line in lines)
    assert not _noise_pixels(to_array(extraction_chart(report))).any()
