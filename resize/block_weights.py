"""Per-block merge weights: ``input_blocks.*=0.5; 2:re:attn[12]=0`` and the like.

Each entry is ``[N:]PATTERN=WEIGHT``, entries separated by ``;`` or new lines. PATTERN is a glob
(``*``, ``?``, ``[..]``) matched against a whole layer name, or ``re:REGEX`` searched in it. A
layer has three names: the LoRA's own key prefix (``lora_unet_input_blocks_1_...``), the base
model key it changes (``model.diffusion_model.input_blocks.1.1.proj_in.weight``) and that key's
module path (``input_blocks.1.1.proj_in.weight``, diffusion-model prefixes removed), so one
pattern works for every key style. ``N:`` limits the entry to the N-th merged LoRA (1-based). A layer's weight
is the LoRA's own weight times the WEIGHT of the last entry that matches it (1 when none does).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from ..extract.errors import ExtractionInputError

_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ENTRY = re.compile(r"^(?:(\d+):)?(.+)=\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class BlockWeight:
    member: int | None      # 0-based member index, or None: every member
    pattern: str            # as written (for reports)
    regex: re.Pattern[str]
    weight: float
    glob: bool = True        # a glob must match a whole name; a regex anywhere in it

    def matches(self, member: int, names: tuple[str, ...]) -> bool:
        if self.member is not None and self.member != member:
            return False
        if self.glob:
            return any(self.regex.fullmatch(n) for n in names)
        return any(self.regex.search(n) for n in names)


def _bad(text: str, why: str) -> ExtractionInputError:
    return ExtractionInputError(
        f"block weights {text!r}: {why}. Write entries '[N:]PATTERN=WEIGHT' separated by ';', "
        "e.g. 'input_blocks.*=0.5; 2:re:attn[12]=0' (glob, or re:REGEX; N = which LoRA, from 1).")


def parse_block_weights(text: str, members: int) -> list[BlockWeight]:
    """Parse the entries (empty text: none); ``members`` is how many LoRAs are merged."""
    out: list[BlockWeight] = []
    for raw in re.split(r"[;\n]", text or ""):
        entry = raw.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise _bad(entry, "not of the form [N:]PATTERN=WEIGHT")
        index, pattern, value = m.group(1), m.group(2).strip(), float(m.group(3))
        if not math.isfinite(value):
            raise _bad(entry, "the weight is not finite")
        member = None
        if index is not None:
            member = int(index) - 1
            if not 0 <= member < members:
                raise _bad(entry, f"there is no LoRA number {index} (merging {members})")
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as e:
                raise _bad(entry, f"bad regular expression ({e})") from None
        else:
            regex = re.compile(fnmatch.translate(pattern))
        out.append(BlockWeight(member, pattern, regex, value, glob=not pattern.startswith("re:")))
    return out


def block_factor(weights: list[BlockWeight], member: int, *names: str) -> float:
    """The weight of the last entry matching any of ``names`` for ``member`` (1 when none)."""
    factor = 1.0
    names = tuple(n for n in names if n) + tuple(
        n[len(p):] for n in names for p in _MODEL_PREFIXES if n and n.startswith(p))
    for w in weights:
        if w.matches(member, names):
            factor = w.weight
    return factor
