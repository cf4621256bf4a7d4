"""Edges of the extraction core a mutation sample found untested: a small difference's predicted
error on the randomized path, the unknown-rule message, and never overwriting a file."""

from __future__ import annotations

import os

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_matrix
from lora_extract.extract.pipeline import extract_to_file
from lora_extract.extract.rank_rules import select_rank
from lora_extract.extract.synthetic import demo_layers, make_pair
from tests.support.helpers import matrix_with_spectrum


def test_a_tiny_exactly_low_rank_difference_is_predicted_error_free(gen: torch.Generator) -> None:
    # ||dW||^2 is far below 1 and the rank holds all of it: the randomized path's predicted
    # (unclamped) error is the energy left out, ~0, not a floor of 1 divided by a small norm.
    a = matrix_with_spectrum(400, 300, torch.tensor([3e-3, 2e-3, 1e-3, 5e-4]), gen)
    cfg = ExtractConfig(rank=4, clamp_quantile=None, output_dtype="fp16", algorithm="svd_lowrank")
    res = extract_matrix(a.clone(), cfg, generator=torch.Generator().manual_seed(0))
    assert res.rel_error_unclamped < 1e-3
    assert res.rel_error < 1e-2                   # the fp16 factors' measured error


def test_an_unknown_rank_rule_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as e:
        select_rank("adaptive_magic", torch.ones(3), 0.5, 8, 3)
    assert str(e.value) == ("unknown rank rule 'adaptive_magic'; choose one of ['adaptive_energy', "
                            "'adaptive_fro', 'adaptive_quantile', 'adaptive_ratio', 'standard']")


def test_extract_to_file_never_overwrites_unless_asked(tmp_path) -> None:
    base, tuned = make_pair(demo_layers(), seed=0)
    b, t = StateDictSource(base, "b"), StateDictSource(tuned, "t")
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        extract_to_file(b, t, ExtractConfig(rank=4), str(path))
    assert path.read_bytes() == b"keep me"
    extract_to_file(b, t, ExtractConfig(rank=4), str(path), overwrite=True)
    assert os.path.getsize(path) > 100
