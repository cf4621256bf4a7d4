"""``--help`` that shows every option's default, for every subcommand alike."""

from __future__ import annotations

import argparse
import re

# Help that already says its default ("default auto", "default: the mode's").
_STATES_DEFAULT = re.compile(r"\bdefault\b(?! with)")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to each option whose default means something.

    Switches (default False), options without a default (None) and help that already states
    its default are left as they are; the description keeps its own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS
                or "%(default)" in text or _STATES_DEFAULT.search(text)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
