"""The error-vs-size panel of the extraction chart marks this run's file."""

from __future__ import annotations

import numpy as np

from lora_extract.charts import extraction_chart
from lora_extract.charts.size_curve_chart import CHOSEN, LINE
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import demo_layers, make_pair


def _panel(img) -> np.ndarray:
    a = np.asarray(img.convert("RGB"))
    h, w, _ = a.shape
    return a[int(h * 0.70):, w - (w - 72) // 4 - 16:]      # the bottom-right quarter


def test_the_curve_panel_marks_the_chosen_point_where_the_curve_passes() -> None:
    base, tuned = make_pair(demo_layers(), seed=0)
    report = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"),
                          ExtractConfig(rank=32, target_size_mb=0.3)).report
    panel = _panel(extraction_chart(report))
    assert (panel == CHOSEN).all(axis=-1).sum() > 20          # the marker and its label
    assert (panel == LINE).all(axis=-1).sum() > 100           # the curve
    report.size_curve = None
    panel = _panel(extraction_chart(report))
    assert (panel == CHOSEN).all(axis=-1).sum() == 0
    assert (panel == LINE).all(axis=-1).sum() > 0             # only the spectra remain (their line)
