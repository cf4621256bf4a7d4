"""Every option error of ``ExtractConfig`` is one message a user can act on, word for word.

The node shows these texts as they are and the command line prints them as its one line, so
each is compared whole: what is wrong, the bad value, and the fix.
"""

from __future__ import annotations

import pytest

from lora_extract.extract import ExtractConfig, ExtractionInputError

CASES = [
    (dict(lora_type="lowrank"), "lora_type 'lowrank' is not one of standard, full, adaptive_ratio, "
     "adaptive_quantile, adaptive_energy, adaptive_fro."),
    (dict(algorithm="svd"), "algorithm 'svd' is not one of svd_linalg, svd_lowrank."),
    (dict(rank=0), "rank 0 is out of range: use 1..4096."),
    (dict(rank=4097), "rank 4097 is out of range: use 1..4096."),
    (dict(conv_rank=-1), "conv_rank -1 is out of range: use 0 (same as rank) or 1..4096."),
    (dict(text_encoder_rank=5000), "text_encoder_rank 5000 is out of range: use 0 (same as rank) "
     "or 1..4096."),
    (dict(lowrank_iters=0), "lowrank_iters 0 is out of range: use 1..100."),
    (dict(adaptive_param=1.5), "adaptive_param 1.5 is out of range: use 0.0..1.0."),
    (dict(clamp_quantile=1.5), "clamp_quantile 1.5 is out of range: use a value in (0, 1], "
     "e.g. 0.99, or turn clamping off."),
    (dict(clamp_quantile=0.0), "clamp_quantile 0.0 is out of range: use a value in (0, 1], "
     "e.g. 0.99, or turn clamping off."),
    (dict(output_dtype="fp8"), "output_dtype 'fp8' is not one of fp16, bf16, fp32."),
    (dict(alpha=-1.0), "alpha -1.0 must be >= 0 (0 means alpha = rank)."),
    (dict(target_size_mb=4, lora_type="full"), "target_size_mb 4 cannot be combined with lora_type "
     "'full': store the whole difference without a budget. Use lora_type 'standard' (rank and "
     "conv_rank are then the per-layer caps), or target_size_mb 0."),
    (dict(target_size_mb=4, lora_type="adaptive_energy"), "target_size_mb 4 cannot be combined "
     "with lora_type 'adaptive_energy': the budget chooses every layer's rank itself. Use "
     "lora_type 'standard' (rank and conv_rank are then the per-layer caps), or target_size_mb 0."),
    (dict(size_objective="max"), "size_objective 'max' is not one of mean, worst: mean (the least "
     "average layer error) or worst (the least worst-layer error)."),
    (dict(key_style="a1111"), "key_style 'a1111' is not one of auto, comfy, kohya, diffusers."),
    (dict(device="gpu"), "device 'gpu' is not a torch device; use cpu, cuda or cuda:N."),
]


@pytest.mark.parametrize("options,message", CASES, ids=[next(iter(o)) + "=" + repr(o[next(iter(o))])
                                                        for o, _ in CASES])
def test_each_bad_option_is_one_exact_message(options: dict, message: str) -> None:
    with pytest.raises(ExtractionInputError) as e:
        ExtractConfig(**options).validate()
    assert str(e.value) == message


@pytest.mark.parametrize("q", [1.0, 0.5, 1e-6])
def test_clamp_quantiles_in_range_are_taken(q: float) -> None:
    assert ExtractConfig(clamp_quantile=q).validate().clamp_quantile == q
