"""Report charts: size, determinism, what is drawn where, and no ComfyUI import."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from lora_extract.charts import (
    HEIGHT,
    WIDTH,
    ChartLayer,
    SpectrumSeries,
    extraction_chart,
    render_report_chart,
    to_array,
)
from lora_extract.charts.layer_chart import BAND_COLORS, RANK_COLOR
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import demo_layers, make_pair


def _rows() -> list[ChartLayer]:
    return [ChartLayer("diffusion_model.input_blocks.1.1.a.weight", "input_blocks.1", 4, 0.01, "lora"),
            ChartLayer("diffusion_model.input_blocks.1.1.b.weight", "input_blocks.1", 8, 2.0, "lora"),
            ChartLayer("diffusion_model.middle_block.1.c.weight", "middle_block", None, 1.0, "uncovered")]


def _columns_with(arr: np.ndarray, color: tuple[int, int, int], rows: slice) -> np.ndarray:
    """Pixel count of ``color`` in each column of the rows ``rows``."""
    px = np.round(arr[rows] * 255).astype(int)
    return (px == np.array(color)).all(axis=-1).sum(axis=0)


def test_block_label_groups_by_container_and_index() -> None:
    from lora_extract.memory.blocks import block_label as block_of

    assert block_of("diffusion_model.input_blocks.1.1.proj_in.weight") == "input_blocks.1"
    assert block_of("model.diffusion_model.output_blocks.11.0.skip.weight") == "output_blocks.11"
    assert block_of("diffusion_model.middle_block.1.proj_out.weight") == "middle_block"
    assert block_of("double_blocks.3.img_attn.qkv.weight") == "double_blocks.3"
    assert block_of("diffusion_model.patch_embedding.weight") == "patch_embedding"
    assert block_of("pos_embed") == "pos_embed"


def test_chart_size_and_determinism() -> None:
    spectra = [SpectrumSeries("k", [4.0, 2.0, 1.0, 0.5, 0.25], 2)]
    a = render_report_chart(_rows(), spectra, "title", "sub")
    b = render_report_chart(_rows(), spectra, "title", "sub")
    assert a.size == (WIDTH, HEIGHT) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    arr = to_array(a)
    assert arr.shape == (HEIGHT, WIDTH, 3) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    small = render_report_chart(_rows(), spectra, "title", width=640, height=480)
    assert small.size == (640, 480)
    other = render_report_chart(_rows()[:2], spectra, "title", "sub")
    assert other.tobytes() != a.tobytes()


def test_bars_show_rank_height_and_error_band() -> None:
    arr = to_array(render_report_chart(_rows(), [], "t"))
    rank_rows = slice(int(HEIGHT * 0.10), int(HEIGHT * 0.30) + 1)
    err_rows = slice(int(HEIGHT * 0.35), int(HEIGHT * 0.60) + 1)
    rank_px = _columns_with(arr, RANK_COLOR, rank_rows)
    third = WIDTH // 3
    first, second = rank_px[:third].max(), rank_px[third: 2 * third].max()
    assert first > 0 and abs(second / first - 2.0) < 0.05  # rank 8 bar twice the rank 4 bar
    assert _columns_with(arr, BAND_COLORS[0], err_rows)[:third].max() > 0       # 1%: excellent
    assert _columns_with(arr, BAND_COLORS[3], err_rows)[third: 2 * third].max() > 0  # 200%: worse


def test_extraction_chart_from_a_real_report() -> None:
    base, tuned = make_pair(demo_layers(16), seed=2)
    rep = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=4, output_dtype="fp32")).report
    img = extraction_chart(rep)
    assert img.size == (WIDTH, HEIGHT)
    assert img.tobytes() == extraction_chart(rep).tobytes()


def test_charts_import_no_comfyui() -> None:
    code = ("import sys, lora_extract.charts\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'comfy_api')]\n"
            "sys.exit(1 if bad else 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd="/").returncode == 0
