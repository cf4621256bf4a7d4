"""What one user-facing option is: declared once, read by the nodes, the CLI, validation and docs.

An :class:`Option` holds everything the places that show or check an option need: the name
(node input and config field), the kind of value, default, range, the node's tooltip, the
command-line flag and its one help line. The nodes build their inputs from it
(``nodes/comfy_io.py``), the command line its flags (``cli/option_flags.py``), the configs check
their values with :meth:`Option.check`, and the docs tests compare the pages with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import ExtractionInputError

KINDS = ("int", "float", "bool", "choice", "string")


@dataclass(frozen=True)
class Option:
    """One option. ``field`` is the config field it sets (``None``: a node-only input)."""

    name: str
    kind: str
    default: object
    tooltip: str                        # the node's tooltip, whole sentences
    doc: str = ""                       # one line: the CLI help and the docs' table cell
    min: float | None = None
    max: float | None = None
    step: float | None = None
    # The choices, or a function giving them when asked (lora_type: the rank-rule registry, so
    # a rule registered later still reaches the node and the command line).
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    optional: bool = False              # an optional node input (after the required ones)
    multiline: bool = False
    flag: str | None = None             # the command-line flag; None: not on the command line
    metavar: str | None = None
    off_flag: str | None = None         # a switch that turns a boolean (or a value) off
    off_doc: str = ""                   # its help line, when the option has a value flag too
    cli_kind: str | None = None         # the flag's kind when it differs from the node's
    cli_default: object = ...           # the flag's default when it differs (... = same)
    field: str | None = ""              # "" = same as name; None = node only
    to_config: Callable[[object], object] | None = None   # node value -> config value
    range_text: str | None = None       # the fix in an out-of-range error; default "lo..hi"
    node: bool = True                   # False: command line (and config) only, no node input
    repeatable: bool = False            # a string flag given several times: joined with ';'

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "choice" and self.default not in self.values():
            raise ValueError(f"option {self.name}: default {self.default!r} not in its choices")

    def values(self) -> tuple[str, ...]:
        """The choices as they are now."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    @property
    def config_field(self) -> str | None:
        return self.name if self.field == "" else self.field

    @property
    def flag_default(self) -> object:
        return self.default if self.cli_default is ... else self.cli_default

    def config_value(self, node_value: object) -> object:
        """The config value a node widget value stands for."""
        return node_value if self.to_config is None else self.to_config(node_value)

    def check(self, value: object) -> None:
        """Refuse a value outside the choices or the range, naming the option and the fix."""
        if self.kind == "choice":
            if value not in self.values():
                raise ExtractionInputError(
                    f"{self.name} {value!r} is not one of {', '.join(self.values())}.")
            return
        if self.kind not in ("int", "float") or self.min is None:
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not isinstance(value, int):
            number = False
        if not number or value != value or not self.min <= value <= self.max:
            fix = self.range_text or f"{self.min}..{self.max}"
            raise ExtractionInputError(f"{self.name} {value!r} is out of range: use {fix}.")


def by_name(options: Iterable[Option]) -> dict[str, Option]:
    return {o.name: o for o in options}
