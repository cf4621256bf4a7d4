"""Which parameters go into the LoRA: a named preset, include patterns and exclude patterns.

Patterns use the syntax of resize's block weights: a glob (``*``, ``?``, ``[..]``; ``*`` also
crosses dots) matched against a whole name, or ``re:REGEX`` searched anywhere in it; several
patterns are separated by ``;`` or new lines. A parameter has two names and a pattern may match
either: its path in the model (``double_blocks.0.img_attn.qkv.weight``,
``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``,
``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``) and
its key in the fine-tuned file (``model.diffusion_model.double_blocks.0...``).

A parameter is extracted when the preset keeps it, it matches an include pattern (or there is
none) and it matches no exclude pattern. The selection is applied to the pairing, before any
weight is read, so a left-out layer costs neither reading nor SVD; every left-out parameter is
in the report with the rule that left it out.

The presets are patterns too (``PRESETS``; docs/settings.md lists them). They name modules the
way SD1.5/SDXL UNets (original and diffusers names), Flux, SD3, Wan, HunyuanVideo and the CLIP,
T5 and LLM text encoders do: attention modules contain ``attn`` or ``attention``; feed-forward
modules are ``mlp``, ``ff``, ``ffn``, ``*_mlp``, ``ff_context``, ``feed_forward`` or
``DenseReluDense``; Flux's single blocks fuse attention and MLP in ``linear1``/``linear2``
(``proj_out`` in diffusers names), which ``attention`` keeps.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ExtractionInputError

# Norm layers: a module whose name contains "norm" (norm1, norm_q, query_norm, layer_norm,
# input_layernorm, final_layer_norm), "ln_*" modules, and the UNet's unnamed GroupNorms
# (a ResBlock's in_layers.0 / out_layers.0, the output's out.0).
NORM_PATTERNS = (
    r"re:(?i)(^|\.)[^.]*norm[^.]*(\.|$)",
    r"re:(?i)(^|\.)ln_[^.]*\.",
    r"re:(^|\.)(in_layers|out_layers)\.0\.",
    r"re:^out\.0\.",
)
# Embeddings: modules (or root parameters) named *embed, *embedding(s), *embedder, *emb
# (pos_embed, time_embed, label_emb, x_embedder, patch_embedding, token_embedding), LLM
# embed_tokens, T5's shared table and relative position bias, Flux/HunyuanVideo input layers
# (img_in, txt_in, time_in, vector_in, guidance_in), Wan's time_projection, the UNet's first
# conv (input_blocks.0.0, conv_in).
EMBED_PATTERNS = (
    r"re:(?i)(^|\.)[^.]*(embed|embeds|embedding|embeddings|embedder|emb)(\.|$)",
    r"re:(^|\.)(embed_tokens|relative_attention_bias)(\.|$)",
    r"re:(^|\.)shared\.weight$",
    r"re:^(img_in|txt_in|time_in|vector_in|guidance_in|time_projection|conv_in)\.",
    r"re:^input_blocks\.0\.0\.",
)
# Output heads at the model's root (final_layer, head, proj_out, conv_out, norm_out, the UNet's
# out.*) and the text encoders' projections.
HEAD_PATTERNS = (
    r"re:^(final_layer|head|proj_out|conv_out|norm_out|out|lm_head)(\.|$)",
    r"re:(^|\.)(text_projection|lm_head)(\.|$)",
)
ATTENTION_PATTERNS = (
    r"re:(?i)(^|\.)[^.]*(attn|attention)[^.]*\.",
    r"re:(^|\.)single_blocks\.\d+\.linear[12]\.",
    r"re:(^|\.)single_transformer_blocks\.\d+\.proj_out\.",
)
MLP_PATTERNS = (
    r"re:(?i)(^|\.)(mlp|ff|ffn|ff_context|feed_forward|densereludense|[^.]*_mlp)(\.|$)",
)


@dataclass(frozen=True)
class Preset:
    """A named selection: what it keeps (empty: everything) and what it then leaves out."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    what: str            # the layers it keeps, in words (report reasons, docs)


PRESETS: dict[str, Preset] = {
    "all": Preset((), (), "every layer"),
    "attention": Preset(ATTENTION_PATTERNS, NORM_PATTERNS + EMBED_PATTERNS,
                        "attention projections"),
    "attention_mlp": Preset(ATTENTION_PATTERNS + MLP_PATTERNS, NORM_PATTERNS + EMBED_PATTERNS,
                            "attention and feed-forward (MLP) layers"),
    "no_embed_head_norm": Preset((), EMBED_PATTERNS + HEAD_PATTERNS + NORM_PATTERNS,
                                 "everything but embeddings, output heads and norms"),
}
LAYER_PRESETS = tuple(PRESETS)


@dataclass(frozen=True)
class Pattern:
    text: str                 # as written (reports)
    regex: re.Pattern[str]
    glob: bool                # a glob matches a whole name; a regex anywhere in it

    def matches(self, names: Iterable[str]) -> bool:
        if self.glob:
            return any(self.regex.fullmatch(n) for n in names)
        return any(self.regex.search(n) for n in names)


def parse_patterns(text: str, field_name: str) -> tuple[Pattern, ...]:
    """``;``- or newline-separated globs / ``re:REGEX``; a bad regex names the field."""
    out = []
    for raw in re.split(r"[;\n]", text or ""):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("re:"):
            try:
                regex = re.compile(entry[3:])
            except re.error as e:
                raise ExtractionInputError(
                    f"{field_name} pattern {entry!r} is not a valid regular expression ({e}). "
                    "Write a glob (e.g. '*attn*') or 're:' and a Python regex (e.g. "
                    "'re:attn[12]'); separate patterns with ';'.") from None
            out.append(Pattern(entry, regex, glob=False))
        else:
            out.append(Pattern(entry, re.compile(fnmatch.translate(entry)), glob=True))
    return tuple(out)


@dataclass(frozen=True)
class Selection:
    preset: str
    preset_include: tuple[Pattern, ...]
    preset_exclude: tuple[Pattern, ...]
    include: tuple[Pattern, ...]
    exclude: tuple[Pattern, ...]

    @property
    def active(self) -> bool:
        return bool(self.preset_include or self.preset_exclude or self.include or self.exclude)

    def left_out_by(self, names: tuple[str, ...]) -> str | None:
        """Why a parameter with these names is left out, or None when it is selected."""
        what = PRESETS[self.preset].what
        if self.preset_include and not any(p.matches(names) for p in self.preset_include):
            return f"left out by layer_preset {self.preset!r}: not one of its {what}"
        hit = next((p for p in self.preset_exclude if p.matches(names)), None)
        if hit is not None:
            return (f"left out by layer_preset {self.preset!r} ({what}): matches its exclude "
                    f"pattern {hit.text!r}")
        if self.include and not any(p.matches(names) for p in self.include):
            return "left out: matches none of the include patterns"
        hit = next((p for p in self.exclude if p.matches(names)), None)
        if hit is not None:
            return f"left out by exclude pattern {hit.text!r}"
        return None


def check_selection_options(layer_preset: str, include: str, exclude: str) -> Selection:
    """The selection an ``ExtractConfig`` asks for; bad presets and patterns are input errors."""
    if layer_preset not in PRESETS:
        raise ExtractionInputError(
            f"layer_preset {layer_preset!r} is not one of {', '.join(PRESETS)}.")
    preset = PRESETS[layer_preset]
    return Selection(layer_preset, parse_patterns(";".join(preset.include), "preset"),
                     parse_patterns(";".join(preset.exclude), "preset"),
                     parse_patterns(include, "include"), parse_patterns(exclude, "exclude"))


@dataclass
class SelectionOutcome:
    """What a selection kept and left out, for the report and the dry run."""

    kept: int = 0
    kept_elements: int = 0
    left_out: int = 0
    left_out_elements: int = 0
    unmatched_includes: tuple[str, ...] = ()
    by_rule: dict[str, int] | None = None     # left-out reason -> parameters

    def note_lines(self) -> list[str]:
        """The report's notes: the selection's size, and include patterns that matched nothing."""
        return [self.lines()[0]] + [f"include pattern {p!r} matched no parameter"
                                    for p in self.unmatched_includes]

    def lines(self) -> list[str]:
        total = self.kept + self.left_out
        lines = [f"selection: {self.kept} of {total} parameters "
                 f"({self.kept_elements / 1e6:.2f}M of "
                 f"{(self.kept_elements + self.left_out_elements) / 1e6:.2f}M weights)"]
        lines.extend(f"  {n} {reason}" for reason, n in sorted((self.by_rule or {}).items()))
        lines.extend(f"  include pattern {p!r} matched no parameter"
                     for p in self.unmatched_includes)
        return lines


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def names_of(path: str, key: str) -> tuple[str, ...]:
    return (path,) if path == key else (path, key)


def select(items: list, selection: Selection, name_fn, shape_fn
           ) -> tuple[list, list[tuple[object, str]], SelectionOutcome]:
    """Split ``items`` into (kept, [(item, reason)], outcome); ``name_fn(item)`` gives its
    names, ``shape_fn(item)`` its shape."""
    kept: list = []
    dropped: list[tuple[object, str]] = []
    outcome = SelectionOutcome(by_rule={})
    matched = set()
    for item in items:
        names = name_fn(item)
        for p in selection.include:
            if p.matches(names):
                matched.add(p.text)
        reason = selection.left_out_by(names) if selection.active else None
        n = _elements(shape_fn(item))
        if reason is None:
            kept.append(item)
            outcome.kept += 1
            outcome.kept_elements += n
        else:
            dropped.append((item, reason))
            outcome.left_out += 1
            outcome.left_out_elements += n
            assert outcome.by_rule is not None
            outcome.by_rule[reason] = outcome.by_rule.get(reason, 0) + 1
    outcome.unmatched_includes = tuple(p.text for p in selection.include if p.text not in matched)
    return kept, dropped, outcome
