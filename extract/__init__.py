"""The extraction core: weight sources, per-layer SVD, rank rules, writer and report.

Imports torch, safetensors and numpy only, never ComfyUI (a test checks this).
"""

from .config import ALGORITHMS, LORA_TYPES, OUTPUT_DTYPES, ExtractConfig
from .errors import ExtractionInputError, ExtractionInterrupted
from .formats.dispatch import open_source
from .layer import LayerExtraction, LoraFactors, extract_matrix, layer_kind
from .pipeline import extract_lora, extract_to_file
from .rank_rules import RANK_RULES, SpectrumTotals, register_rank_rule, select_rank
from .report import ExtractionReport, LayerReport
from .result import ExtractionResult, NothingToExtract
from .sources import SafetensorsSource, StateDictSource, WeightSource

__all__ = [
    "ALGORITHMS", "LORA_TYPES", "OUTPUT_DTYPES", "RANK_RULES", "ExtractConfig",
    "ExtractionInputError", "ExtractionInterrupted", "ExtractionReport", "ExtractionResult",
    "LayerExtraction", "LayerReport", "LoraFactors", "NothingToExtract", "SafetensorsSource",
    "SpectrumTotals", "StateDictSource", "WeightSource", "extract_lora", "extract_matrix",
    "extract_to_file", "layer_kind", "open_source", "register_rank_rule", "select_rank",
]
