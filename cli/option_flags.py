"""Command-line flags built from the option declarations (``extract/options.py``,
``memory/options.py``): the flag, its type, choices, default and help line come from there.

A boolean option is a switch: ``off_flag`` turns on what the node's default leaves on
(``--no-bias-diff``), ``flag`` turns on what it leaves off (``--memory-log``). An option whose
flag takes a value of another kind than the node's widget (``--clamp-quantile Q`` for the node's
on/off clamp) says so with ``cli_kind``; its ``off_flag`` is then a switch beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..extract.option_spec import Option

_TYPES = {"int": int, "float": float, "string": str}


def add_option_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                     options: Iterable[Option]) -> None:
    """One flag (and its off switch) per option that has one, in declaration order."""
    for o in options:
        kind = o.cli_kind or o.kind
        if kind == "bool":
            if o.off_flag:
                p.add_argument(o.off_flag, dest=_off_dest(o), action="store_true", help=_help(o.doc))
            if o.flag:
                p.add_argument(o.flag, dest=o.name, action="store_true", help=_help(o.doc))
            continue
        if o.flag is None:
            continue
        extra = {"choices": o.values()} if kind == "choice" else {"type": _TYPES[kind]}
        if o.repeatable:
            # Each use adds patterns; option_value joins them with the ';' of the node's text.
            p.add_argument(o.flag, dest=o.name, default=None, action="append", metavar=o.metavar,
                           help=_help(o.doc), **extra)
        else:
            p.add_argument(o.flag, dest=o.name, default=o.flag_default, metavar=o.metavar,
                           help=_help(o.doc), **extra)
        if o.off_flag:
            p.add_argument(o.off_flag, dest=_off_dest(o), action="store_true",
                           help=_help(o.off_doc))


def _help(text: str) -> str:
    return text.replace("%", "%%")   # argparse formats help with %


def _off_dest(o: Option) -> str:
    return "no_" + o.name


def option_value(a: argparse.Namespace, o: Option) -> object:
    """The config value the flags give for ``o`` (its default when the flag is absent)."""
    kind = o.cli_kind or o.kind
    off = bool(getattr(a, _off_dest(o), False)) if o.off_flag else False
    if kind == "bool":
        if o.off_flag:
            return not off
        return bool(getattr(a, o.name, o.flag_default))
    value = getattr(a, o.name, o.flag_default)
    if o.repeatable:
        value = ";".join(value) if value else o.flag_default
    return None if off else value


def config_values(a: argparse.Namespace, options: Iterable[Option]) -> dict[str, object]:
    """``{config field: value}`` for every option with a flag and a config field."""
    return {o.config_field: option_value(a, o) for o in options
            if o.config_field is not None and (o.flag or o.off_flag)}


def flag_names(options: Iterable[Option]) -> dict[str, str]:
    """``{option name: the flag a message should name}`` (for error messages)."""
    return {o.name: o.flag or o.off_flag for o in options if o.flag or o.off_flag}
