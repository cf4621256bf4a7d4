"""Extraction options as one validated, serialisable dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from .budget.rank_math import check_target_size
from .budget.size_types import MIB
from .errors import ExtractionInputError
from .options import (
    ALGORITHMS,
    DORA_OPTIONS,
    EXTRACT,
    LORA_TYPES,
    MAX_RANK,
    NEW_TENSOR_MODES,
    OUTPUT_DTYPES,
)
from .rank_rules import RANK_RULES

__all__ = ["ALGORITHMS", "DORA_OPTIONS", "LORA_TYPES", "MAX_RANK", "OUTPUT_DTYPES", "ExtractConfig"]


@dataclass(frozen=True)
class ExtractConfig:
    """Every knob of an extraction. Defaults are those of the LoraExtract node.

    Names, defaults, choices and ranges are declared in ``options.py``; a test checks the
    defaults here against it (a dataclass default has to be written out).
    """

    rank: int = 8
    lora_type: str = "standard"
    algorithm: str = "svd_linalg"
    lowrank_iters: int = 8
    output_dtype: str = "fp16"
    bias_diff: bool = True
    adaptive_param: float = 0.15
    clamp_quantile: float | None = 0.99   # None: no clamp
    conv_rank: int = 0                    # 0: same as rank
    alpha: float = 0.0                    # 0: alpha equals each layer's rank (scale 1)
    key_style: str = "auto"               # auto: diffusers for diffusers-named inputs, else comfy
    device: str = "cpu"
    seed: int = 0                         # randomized SVD sketch; fixed for reproducible files
    oversample: int = 16                  # extra randomized sketch columns past the rank cap
    target_size_mb: float = 0.0           # 0: off; else ranks allocated to fit this many MiB
    text_encoder_rank: int = 0            # rank (cap) for text-encoder layers; 0: same as rank
    size_objective: str = "mean"          # with target_size_mb: "mean" or "worst" layer error
    dora: str = "off"                     # "output"/"input": store a dora_scale on that axis
    skip_noise_layers: bool = False       # quantized inputs: leave out layers at the noise floor
    # Which layers go in (extract/selection.py): a preset, then ';'-separated glob / re: patterns.
    layer_preset: str = "all"
    include: str = ""
    exclude: str = ""
    # Skip layers that barely changed (extract/change_threshold.py); 0: off.
    min_change_rel: float = 0.0           # ||dW|| / ||W|| below this: left out
    min_change_abs: float = 0.0           # ||dW|| below this: left out
    new_tensors: str = "set_weight"       # fine-tune-only parameters: set_weight or skip

    def validate(self) -> ExtractConfig:
        def bad(what: str) -> ExtractionInputError:
            return ExtractionInputError(what)
        EXTRACT["lora_type"].check(self.lora_type)
        if self.lora_type != "full" and self.lora_type not in RANK_RULES:
            raise bad(f"lora_type {self.lora_type!r} has no rank rule.")
        for name in ("algorithm", "rank", "conv_rank", "text_encoder_rank", "lowrank_iters",
                     "adaptive_param"):
            EXTRACT[name].check(getattr(self, name))
        if self.clamp_quantile is not None and not 0.0 < self.clamp_quantile <= 1.0:
            raise bad(f"clamp_quantile {self.clamp_quantile!r} is out of range: use a value in "
                      "(0, 1], e.g. 0.99, or turn clamping off.")
        EXTRACT["output_dtype"].check(self.output_dtype)
        if not self.alpha >= 0 or self.alpha != self.alpha:
            raise bad(f"alpha {self.alpha!r} must be >= 0 (0 means alpha = rank).")
        self._validate_target_size()
        self._validate_dora()
        self._validate_selection()
        EXTRACT["key_style"].check(self.key_style)
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise bad(f"device {self.device!r} is not a torch device; use cpu, cuda or cuda:N.") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            # Caught here, not as a torch assertion half-way through the first layer.
            raise bad(f"device {self.device!r}: CUDA is not available to this torch; use cpu.")
        return self

    def _validate_target_size(self) -> None:
        check_target_size(self.target_size_mb)
        if self.size_objective not in EXTRACT["size_objective"].values():
            raise ExtractionInputError(
                f"size_objective {self.size_objective!r} is not one of "
                f"{', '.join(EXTRACT['size_objective'].values())}: "
                "mean (the least average layer error) or worst (the least worst-layer error).")
        if self.target_size_mb and self.lora_type != "standard":
            fix = ("store the whole difference without a budget" if self.lora_type == "full" else
                   "the budget chooses every layer's rank itself")
            raise ExtractionInputError(
                f"target_size_mb {self.target_size_mb:g} cannot be combined with lora_type "
                f"{self.lora_type!r}: {fix}. Use lora_type 'standard' (rank and conv_rank are "
                "then the per-layer caps), or target_size_mb 0.")

    def _validate_dora(self) -> None:
        if self.dora not in DORA_OPTIONS:
            raise ExtractionInputError(
                f"dora {self.dora!r} is not one of {', '.join(DORA_OPTIONS)}: off (plain LoRA), "
                "output or input (the axis of the stored magnitude).")
        if self.dora == "off":
            return
        if self.lora_type == "full":
            raise ExtractionInputError(
                f"dora {self.dora!r} cannot be combined with lora_type 'full': a full difference "
                "already reproduces the fine-tuned weight. Use a low-rank lora_type, or dora off.")
        if self.target_size_mb:
            raise ExtractionInputError(
                f"dora {self.dora!r} cannot be combined with target_size_mb "
                f"{self.target_size_mb:g}: the size budget allocates plain-LoRA ranks. Use a rank "
                "(or an adaptive lora_type) with DoRA, or dora off with the budget.")

    def _validate_selection(self) -> None:
        from .selection import check_selection_options

        check_selection_options(self.layer_preset, self.include, self.exclude)
        for name in ("min_change_rel", "min_change_abs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ExtractionInputError(
                    f"{name} {value!r} must be a finite number >= 0 (0: off).")
        if self.new_tensors not in NEW_TENSOR_MODES:
            raise ExtractionInputError(
                f"new_tensors {self.new_tensors!r} is not one of {', '.join(NEW_TENSOR_MODES)}.")

    @property
    def budget_bytes(self) -> int:
        """The size budget in bytes (MiB = 2**20 bytes); 0 when off."""
        return int(self.target_size_mb * MIB)

    def name_tag(self) -> str:
        """The part of output names after the prefix: ``rank_8`` or ``size_64mb``."""
        if self.target_size_mb:
            worst = "_worst" if self.size_objective == "worst" else ""
            return f"size_{self.target_size_mb:g}mb{worst}"
        dora = f"_dora_{self.dora}" if self.dora != "off" else ""
        return f"rank_{self.file_tag()}{dora}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return OUTPUT_DTYPES[self.output_dtype]

    def rank_cap(self, ndim: int) -> int:
        """The rank (cap) for a weight with ``ndim`` dimensions: conv layers may differ."""
        if ndim >= 3 and self.conv_rank:
            return self.conv_rank
        return self.rank

    def file_tag(self) -> str:
        """The ``{rank or type_param}`` part of output names: ``8`` or ``adaptive_ratio_0.15``."""
        if self.lora_type == "standard":
            return str(self.rank)
        if self.lora_type == "full":
            return "full"
        return f"{self.lora_type}_{self.adaptive_param:g}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def metadata(self) -> dict[str, str]:
        """Every extraction parameter, as safetensors metadata (strings only)."""
        meta = {f"lora_extract.{k}": json.dumps(v) for k, v in self.to_dict().items()}
        meta["lora_extract.config"] = json.dumps(self.to_dict(), sort_keys=True)
        return meta
