"""``size_objective`` ``worst``: the least worst-layer error for the bytes, then the bytes left.

Oracles: brute force over every rank combination (the min-max error that fits), the
allocator's own promises (never over budget, each layer a rank, nothing left that still fits),
and the end to end file (name, bytes, report, V1 == V2, node and command line).
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_extract.cli import main
from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource, extract_lora
from lora_extract.extract.budget.allocate import allocate
from lora_extract.extract.budget.rank_math import LayerSpectrum, plan_ranks
from lora_extract.extract.synthetic import demo_layers, make_pair, write_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.extract.budget.test_size_target import (
    CAP,
    LAYERS,
    MIB,
    cfg_for,
    constructed_pair,
    rel_sq,
    unit_bytes,
)

PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@st.composite
def spectra(draw):
    """2-4 layers, each a descending spectrum (errors fall with rank) and its own rank cost."""
    layers = []
    for _ in range(draw(st.integers(2, 4))):
        n = draw(st.integers(1, 5))
        sigma = sorted(draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)), reverse=True)
        layers.append((torch.tensor(sigma, dtype=torch.float64), draw(st.integers(1, 6))))
    need = sum(c for _, c in layers)
    top = sum(s.numel() * c for s, c in layers)
    return layers, draw(st.integers(need, top + 3))


def _spectrum(i: int, sigma: torch.Tensor, cost: int) -> LayerSpectrum:
    return LayerSpectrum(f"l{i}", sigma, float((sigma ** 2).sum()), cost, sigma.numel())


def _errors(layers, ranks) -> list[float]:
    return [float((s[r:] ** 2).sum() / (s ** 2).sum()) for (s, _), r in zip(layers, ranks, strict=True)]


def _plan(layers, budget):
    # ALPHA_BYTES (4) per layer is part of the required bytes: add it to the budget.
    return plan_ranks([_spectrum(i, s, c) for i, (s, c) in enumerate(layers)], 0,
                      budget + 4 * len(layers), "worst")


@PROPS
@given(spectra())
def test_worst_reaches_the_least_max_error_that_fits_and_leaves_nothing_that_fits(p):
    layers, budget = p
    plan = _plan(layers, budget)
    spent = sum(r * c for (_, c), r in zip(layers, plan.ranks, strict=True))
    assert spent + 4 * len(layers) == plan.outcome.used_bytes <= budget + 4 * len(layers)
    # Brute force: the least worst-layer error of every rank combination that fits.
    best = min(max(_errors(layers, ranks))
               for ranks in itertools.product(*[range(1, s.numel() + 1) for s, _ in layers])
               if sum(r * c for (_, c), r in zip(layers, ranks, strict=True)) <= budget)
    assert max(_errors(layers, plan.ranks)) == pytest.approx(best, abs=1e-12)
    # The fill: no layer below its cap could take one more rank in the bytes left.
    left = budget - spent
    assert all(r == s.numel() or c > left for (s, c), r in zip(layers, plan.ranks, strict=True))


@PROPS
@given(spectra(), st.integers(0, 12))
def test_worst_layer_error_never_rises_with_the_budget(p, extra):
    layers, budget = p
    small, large = _plan(layers, budget), _plan(layers, budget + extra)
    assert max(_errors(layers, large.ranks)) <= max(_errors(layers, small.ranks)) + 1e-12


def test_the_fill_goes_past_the_first_item_that_does_not_fit():
    # Group 0's next item costs 5 and does not fit in the 4 bytes left; group 1's (cost 1) does.
    pri = [torch.tensor([0.9, 0.8], dtype=torch.float64), torch.tensor([0.5, 0.4], dtype=torch.float64)]
    cut = allocate(pri, [5, 1], 9)
    filled = allocate(pri, [5, 1], 9, fill=True)
    assert cut.counts == [1, 0] and cut.used_bytes == 5
    assert filled.counts == [1, 2] and filled.used_bytes == 7 and filled.filled == 2
    assert filled.kept == 3 and filled.next_priority == cut.next_priority == 0.8
    # Required bytes count before the first item: with 3 of them only one cheap item is left.
    assert allocate(pri, [5, 1], 9, required_bytes=3, fill=True).counts == [1, 1]


def test_worst_on_the_constructed_layers_is_the_min_max_and_mean_is_not(gen):
    keys = list(LAYERS)
    fits = [(max(rel_sq(k, r) for k, r in zip(keys, ranks, strict=True)), ranks)
            for ranks in itertools.product(range(1, CAP + 1), repeat=len(keys))
            if sum(r * unit_bytes(k) + 4 for k, r in zip(keys, ranks, strict=True)) <= 2072]
    least_max = min(m for m, _ in fits)
    base, tuned = constructed_pair(gen)
    worst = extract_lora(base, tuned, cfg_for(2072, size_objective="worst")).report
    mean = extract_lora(base, tuned, cfg_for(2072)).report
    ranks = {r.key: r.rank for r in worst.layers}
    assert max(rel_sq(k, ranks[k]) for k in keys) == pytest.approx(least_max, rel=1e-12)
    mean_ranks = {r.key: r.rank for r in mean.layers}
    # Each objective wins its own number here: worst 0.25 vs 0.37 at the worst layer, mean a
    # lower sum (it gives layer a all 4 ranks and c 1).
    assert max(rel_sq(k, mean_ranks[k]) for k in keys) > least_max + 0.1
    assert sum(rel_sq(k, mean_ranks[k]) for k in keys) < sum(rel_sq(k, ranks[k]) for k in keys)
    assert worst.budget.objective == "worst" and mean.budget.objective == "mean"
    assert worst.budget.predicted_max_rel_error == pytest.approx(least_max ** 0.5, rel=1e-6)
    assert worst.tensor_bytes == worst.budget.used_bytes <= 2072


def test_report_and_file_name_say_worst():
    cfg = ExtractConfig(rank=16, target_size_mb=0.05, size_objective="worst")
    assert cfg.name_tag() == "size_0.05mb_worst"
    assert ExtractConfig(rank=16, target_size_mb=0.05).name_tag() == "size_0.05mb"
    base, tuned = make_pair(demo_layers(), seed=3)
    rep = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg).report
    text = rep.format_text()
    assert "objective worst: no layer above relative error" in text
    assert "worst layer " in text and "implied threshold" not in text


def test_v2_gives_v1s_worst_file():
    base, tuned = make_pair(demo_layers(40), seed=2)
    b, t = StateDictSource(base, "b"), StateDictSource(tuned, "t")
    cfg = ExtractConfig(rank=16, target_size_mb=0.02, size_objective="worst")
    v1 = extract_lora(b, t, cfg)
    v2 = extract_lora_streamed(b, t, cfg, MemoryOptions(), cache=ResidentCache()).result
    assert list(v1.tensors) == list(v2.tensors)
    for k, x in v1.tensors.items():
        torch.testing.assert_close(v2.tensors[k], x, msg=k)
    assert v1.report.budget == v2.report.budget and v1.report.budget.objective == "worst"


def test_an_unknown_objective_is_refused_naming_the_choices():
    with pytest.raises(ExtractionInputError, match="size_objective 'max' is not one of mean, worst"):
        ExtractConfig(target_size_mb=1, size_objective="max").validate()
    with pytest.raises(ExtractionInputError, match="size_objective 'max'"):
        plan_ranks([], 0, 100, "max")


def test_command_line_takes_the_objective(tmp_path, capsys) -> None:
    pair = write_pair(str(tmp_path), demo_layers(32), seed=7)
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    assert main(["extract", *pair, "-o", str(out), "--rank", "16", "--target-size", "0.01",
                 "--size-objective", "worst", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["budget"]["objective"] == "worst"
    assert report["budget"]["used_bytes"] <= int(0.01 * MIB)
    assert os.path.getsize(out) == report["summary"]["file_bytes"]
    assert main(["extract", *pair, "--dry-run", "--rank", "16", "--target-size", "0.01",
                 "--size-objective", "worst"]) == 0
    assert "objective worst" in capsys.readouterr().out


@pytest.mark.parametrize("node_id", ["LoraExtract", "LoraExtractV2"])
def test_nodes_offer_the_objective_last_with_mean_by_default(node_id) -> None:
    optional = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]
    kind, opts = optional["size_objective"]
    assert kind == "COMBO" and opts["options"] == ["mean", "worst"] and opts["default"] == "mean"
    # Last: workflows saved before it keep their widget values in place.
    names = list(optional)
    at = names.index("size_objective")
    # each appended after the last; only later optional inputs follow
    assert names[at:at + 2] == ["size_objective", "dora"]
    assert names[at + 2:] == ["dora", "layer_preset", "include", "exclude", "min_change_rel",
                              "min_change_abs", "new_tensors"][1:]
