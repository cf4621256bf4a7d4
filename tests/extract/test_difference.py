"""Chunked float32 differences: bit-identical to ``tuned.float() - base.float()`` for every dtype."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract.difference import CHUNK, difference_into

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
          torch.int8]


def _random(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8)
    return (torch.randn(n, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("n", [7, CHUNK, 2 * CHUNK + 13])
@pytest.mark.parametrize("tuned_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES)
def test_bit_identical_to_the_plain_difference(n: int, tuned_dtype, base_dtype) -> None:
    tuned, base = _random(n, tuned_dtype, 1), _random(n, base_dtype, 2)
    expected = tuned.float() - base.float()
    out = torch.full((n,), float("nan"))
    assert difference_into(out, tuned, base) is out
    assert torch.equal(out, expected)
    # In place (``tuned`` None): out holds fp32(tuned) already.
    inplace = tuned.float()
    difference_into(inplace, None, base, scratch=torch.empty(CHUNK))
    assert torch.equal(inplace, expected)


def test_shapes_strides_and_bad_output() -> None:
    tuned = torch.randn(300, 2000).bfloat16()
    base = torch.randn(300, 2000).bfloat16()
    out = torch.empty(300, 2000)
    difference_into(out, tuned, base)
    assert torch.equal(out, tuned.float() - base.float())
    strided = torch.empty(2000, 300).mT       # a transposed float32 difference (no flat view)
    difference_into(strided, tuned, base)
    assert torch.equal(strided, tuned.float() - base.float())
    with pytest.raises(ValueError, match="float32"):
        difference_into(torch.empty(300, 2000, dtype=torch.float64), tuned, base)
