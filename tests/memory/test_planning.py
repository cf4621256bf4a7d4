"""The V2 policy: block grouping from key names and the pure planner (no torch device)."""

from __future__ import annotations

import pytest

from lora_extract.extract import ExtractionInputError
from lora_extract.memory.blocks import OTHER_BLOCK, block_of, block_priority, group_by_block
from lora_extract.memory.planner import (
    COMPUTE_OVERHEAD,
    BlockSize,
    MemoryOptions,
    form_batches,
    plan_memory,
    shrink_batch,
)

MIB = 2**20


@pytest.mark.parametrize("key,block", [
    ("diffusion_model.input_blocks.4.1.proj_in.weight", "input_blocks.4"),
    ("model.diffusion_model.output_blocks.11.0.in_layers.2.weight", "output_blocks.11"),
    ("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight", "middle_block"),
    ("double_blocks.18.img_attn.qkv.weight", "double_blocks.18"),
    ("diffusion_model.single_blocks.37.linear1.weight", "single_blocks.37"),
    ("joint_blocks.3.x_block.attn.qkv.weight", "joint_blocks.3"),
    ("diffusion_model.blocks.29.self_attn.q.weight", "blocks.29"),
    ("diffusion_model.patch_embedding.weight", OTHER_BLOCK),
    ("diffusion_model.time_embed.0.weight", OTHER_BLOCK),
    ("final_layer.linear.weight", OTHER_BLOCK),
    ("diffusion_model.out.2.weight", OTHER_BLOCK),
])
def test_block_of(key: str, block: str) -> None:
    assert block_of(key) == block


def test_priority_is_middle_output_input_other() -> None:
    names = ["input_blocks.1", OTHER_BLOCK, "output_blocks.0", "middle_block", "double_blocks.0"]
    assert sorted(names, key=block_priority) == [
        "middle_block", "output_blocks.0", "input_blocks.1", OTHER_BLOCK, "double_blocks.0"]
    groups = group_by_block(["input_blocks.1.a.weight", "x.weight", "input_blocks.1.b.weight"])
    assert groups == {"input_blocks.1": ["input_blocks.1.a.weight", "input_blocks.1.b.weight"],
                      OTHER_BLOCK: ["x.weight"]}


def _unet_blocks(size: int = 100 * MIB) -> list[BlockSize]:
    return ([BlockSize(f"input_blocks.{i}", size) for i in range(4)] + [BlockSize("middle_block", size)]
            + [BlockSize(f"output_blocks.{i}", size) for i in range(4)] + [BlockSize(OTHER_BLOCK, size)])


def test_without_accelerator_nothing_is_resident() -> None:
    plan = plan_memory(_unet_blocks(), 10 * MIB, None, MemoryOptions(mode="maximum"))
    assert plan.budget_bytes is None and plan.resident == [] and len(plan.offloaded) == 10
    assert (plan.batch_size, plan.prefetch_ahead) == (8, 8)
    # Host read-ahead is bounded: the batches ahead plus the one in compute, plus one.
    assert plan.staging_bytes == 10 * 10 * MIB


@pytest.mark.parametrize("ahead", [0, 1, 3, 8])
def test_a_batch_may_fill_its_share_of_the_staging_bytes(ahead: int) -> None:
    # Staging holds the batches read ahead plus the one in compute plus one layer; each batch
    # may take an equal share of it (never less than the largest layer): with a larger divisor
    # batches of big layers would be split more than the read-ahead needs.
    largest = 10 * MIB
    plan = plan_memory(_unet_blocks(), largest, None, MemoryOptions(mode="balanced",
                                                                    prefetch_ahead=ahead))
    assert plan.staging_bytes == (ahead + 2) * largest
    assert plan.max_batch_bytes == max(largest, (ahead + 2) * largest // (ahead + 1))
    assert isinstance(plan.max_batch_bytes, int)


def test_resident_blocks_follow_priority_and_count() -> None:
    opts = MemoryOptions(mode="balanced", blocks_in_gpu=3, batch_size=2, prefetch_ahead=1)
    plan = plan_memory(_unet_blocks(), 10 * MIB, 100 * 2**30, opts)
    assert plan.resident == ["middle_block", "output_blocks.0", "output_blocks.1"]
    assert plan.budget_bytes == int(0.75 * 100 * 2**30)
    assert plan.resident_bytes == 300 * MIB
    assert set(plan.resident) | set(plan.offloaded) == {b.name for b in _unet_blocks()}


def test_budget_limits_residency_exactly() -> None:
    # balanced: 75% of 1000 MiB = 750; working = batch bytes * (ahead + 1 + overhead).
    opts = MemoryOptions(mode="balanced", blocks_in_gpu=40, batch_size=1, prefetch_ahead=0)
    plan = plan_memory(_unet_blocks(), 10 * MIB, 1000 * MIB, opts)
    working = plan.max_batch_bytes * (1 + COMPUTE_OVERHEAD)
    assert plan.working_bytes == working
    assert len(plan.resident) == (int(0.75 * 1000 * MIB) - working) // (100 * MIB)
    assert plan.resident_bytes + plan.working_bytes <= plan.budget_bytes


def test_modes_set_budget_and_maximum_keeps_all_that_fits() -> None:
    fractions = {m: plan_memory(_unet_blocks(), MIB, 2**30, MemoryOptions(mode=m)).budget_bytes
                 for m in ("conservative", "balanced", "aggressive", "maximum")}
    assert fractions == {"conservative": 2**29, "balanced": int(0.75 * 2**30),
                         "aggressive": int(0.9 * 2**30), "maximum": int(0.95 * 2**30)}
    big = plan_memory(_unet_blocks(), MIB, 100 * 2**30, MemoryOptions(mode="maximum"))
    assert len(big.resident) == 10                     # no count limit in maximum
    agg = plan_memory(_unet_blocks(), MIB, 100 * 2**30, MemoryOptions(mode="aggressive"))
    assert len(agg.resident) == 10 and agg.batch_size == 6   # 20 allowed, 10 exist


def test_conservative_is_sequential_and_offloads_everything() -> None:
    opts = MemoryOptions(mode="conservative", blocks_in_gpu=40, batch_size=8)
    plan = plan_memory(_unet_blocks(), MIB, 100 * 2**30, opts)
    assert plan.resident == [] and plan.batch_size == 1


def test_explicit_knobs_override_mode_defaults() -> None:
    plan = plan_memory(_unet_blocks(), MIB, 100 * 2**30,
                       MemoryOptions(mode="aggressive", blocks_in_gpu=2, batch_size=3, prefetch_ahead=5))
    assert (len(plan.resident), plan.batch_size, plan.prefetch_ahead) == (2, 3, 5)


def test_small_budget_shrinks_read_ahead_then_batch_and_says_so() -> None:
    largest = 100 * MIB
    plan = plan_memory(_unet_blocks(), largest, 400 * MIB,
                       MemoryOptions(mode="balanced", batch_size=4, prefetch_ahead=2))
    # 300 MiB budget: one 100 MiB layer in compute needs 300 MiB; nothing fits beside it.
    assert plan.prefetch_ahead == 0 and plan.max_batch_bytes == largest
    assert plan.resident == [] and plan.notes
    # The numbers the user reads: balanced uses 75% of the free 400 MiB; a layer in compute
    # needs itself plus COMPUTE_OVERHEAD (2) copies.
    assert plan.notes == ["budget 300 MiB: batch 4 -> 4, read-ahead 2 -> 0 batches."]
    hopeless = plan_memory(_unet_blocks(), largest, 200 * MIB, MemoryOptions(mode="balanced"))
    assert hopeless.batch_size == 1 and hopeless.notes == [
        "the largest layer needs 300 MiB of device memory but the budget is 150 MiB; running "
        "anyway (layers that run out of memory are redone on the CPU).",
        "budget 150 MiB: batch 4 -> 1, read-ahead 2 -> 0 batches."]


def test_form_batches_respects_count_and_bytes() -> None:
    sizes = [10, 10, 10, 50, 10, 10, 200, 10]
    assert form_batches(sizes, 3, 60) == [[0, 1, 2], [3, 4], [5], [6], [7]]
    assert form_batches(sizes, 1, 10**9) == [[i] for i in range(8)]
    assert [shrink_batch(b) for b in (8, 5, 2, 1)] == [4, 2, 1, 1]


@pytest.mark.parametrize("bad", [
    dict(mode="turbo"), dict(blocks_in_gpu=41), dict(batch_size=0), dict(batch_size=9),
    dict(prefetch_ahead=11), dict(memory_threshold=0.4), dict(memory_threshold=0.99),
])
def test_bad_options_are_refused_with_the_value(bad: dict) -> None:
    with pytest.raises(ExtractionInputError, match=repr(next(iter(bad.values())))):
        MemoryOptions(**bad).validate()


def test_torch_probe_counts_the_allocators_idle_cache_as_free(monkeypatch) -> None:
    """As ComfyUI's get_free_memory: cached blocks without a tensor are free for this process."""
    import torch

    from lora_extract.memory.monitor import VramMonitor, torch_probe

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (1 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 3 * gib)
    reading = VramMonitor(torch_probe("cuda:0"), 0.85).read()
    assert reading is not None and (reading.free, reading.total) == (10 * gib, 16 * gib)
    # The driver alone says 15/16 used (over 0.85); this process can still use 10 GiB.
    assert not VramMonitor(torch_probe("cuda:0"), 0.85).over(reading)
    assert torch_probe("cpu")() is None


@pytest.mark.parametrize("knob,value,words", [
    ("blocks_in_gpu", 41, "blocks_in_gpu 41 is out of range: use 0..40."),
    ("batch_size", 0, "batch_size 0 is out of range: use 1..8."),
    ("prefetch_ahead", 11, "prefetch_ahead 11 is out of range: use 0..10."),
    ("memory_threshold", 0.99, "memory_threshold 0.99 is out of range: use 0.5..0.95."),
])
def test_v2_knobs_out_of_range_name_the_knob_value_and_range(knob: str, value, words: str) -> None:
    from lora_extract.extract import ExtractionInputError

    with pytest.raises(ExtractionInputError) as e:
        MemoryOptions(**{knob: value}).validate()
    assert str(e.value) == words
