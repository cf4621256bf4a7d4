"""Is a weight file a LoRA rather than a model? Told from its key names alone.

A model given where a LoRA belongs (or the other way round) otherwise surfaces as a puzzling
"different architectures" error; naming the mistake lets the caller point at the right command.
"""

from __future__ import annotations

from collections.abc import Iterable

# Key endings of LoRA-family files (LoRA, LoCon, LoHa, LoKr, PEFT, diff patches, DoRA).
LORA_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_A.weight",
    ".lora_B.weight", ".lora.up.weight", ".lora.down.weight", ".alpha", ".diff", ".diff_b",
    ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1",
    ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b",
)


def lora_like_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k.endswith(LORA_SUFFIXES)]


def looks_like_lora(keys: Iterable[str]) -> bool:
    """Most keys are LoRA factors / alphas / diff patches: a LoRA file, not a model.

    "Most" (more than half): a model never has such names for most of its weights, and a LoRA
    with a few extra tensors (an embedding) is still a LoRA."""
    keys = list(keys)
    return bool(keys) and 2 * len(lora_like_keys(keys)) > len(keys)
