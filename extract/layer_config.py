"""The options one layer is extracted with (per-layer overrides of the run's config)."""

from __future__ import annotations

from dataclasses import replace

from .config import ExtractConfig
from .keys.te_keys import is_te_key


def layer_config(cfg: ExtractConfig, path: str) -> ExtractConfig:
    """The options one layer is extracted with: text encoders use ``text_encoder_rank``."""
    if not is_te_key(path) or not cfg.text_encoder_rank:
        return cfg
    return replace(cfg, rank=cfg.text_encoder_rank, conv_rank=0)
