"""Error messages in the words the user typed: config field names become command-line flags.

The engine's messages name ``ExtractConfig`` fields, which are also the nodes' input names
(``target_size_mb``, ``bias_diff``). On the command line the same message must name the flag
(``--target-size``, ``--no-bias-diff``). This table is the one place that maps them; whole
phrases first (where a flag reads differently from the field, e.g. an on/off switch), then
field names as whole words.
"""

from __future__ import annotations

import re

from ..extract.options import EXTRACT_OPTIONS
from ..memory.options import MEMORY_OPTIONS
from .option_flags import flag_names

# Phrases whose wording changes with the flag (switches that turn something off).
_PHRASES: tuple[tuple[str, str], ...] = (
    (r"\bturn bias_diff off\b", "pass --no-bias-diff"),
    (r"\bturn bias_diff on\b", "leave out --no-bias-diff"),
    (r"\bbias_diff is off\b", "--no-bias-diff is given"),
    (r"\bturn clamping off\b", "pass --no-clamp"),
    (r"\brank and conv_rank\b", "--rank and --conv-rank"),
)

# Field (and node input) -> flag, from the option declarations. Names with an underscore are
# unambiguous anywhere in a message; plain words (rank, alpha, ...) only where a message starts
# with the field, its value and a verdict ("rank 0 is out of range"), so "rank 1 in each layer"
# keeps its meaning.
_ALL_FLAGS = {**flag_names(EXTRACT_OPTIONS), **flag_names(MEMORY_OPTIONS)}
FIELD_FLAGS: dict[str, str] = {n: f for n, f in _ALL_FLAGS.items() if "_" in n}
_LEADING_WORDS: dict[str, str] = {**{n: f for n, f in _ALL_FLAGS.items() if "_" not in n},
                                  "device": "--device"}

_LEADING = re.compile(rf"^({'|'.join(_LEADING_WORDS)}) \S+ (is|must)\b")


def with_flag_names(message: str) -> str:
    """``message`` with every config field it names replaced by the command-line flag."""
    for pattern, flag_text in _PHRASES:
        message = re.sub(pattern, flag_text, message)
    for field_name, flag in FIELD_FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(field_name)}\b", flag, message)
    m = _LEADING.match(message)
    if m:
        message = _LEADING_WORDS[m.group(1)] + message[len(m.group(1)):]
    return message
