"""Errors the user can act on.

Every error raised for bad input is an :class:`ExtractionInputError` whose message names the
offending key or file, the bad value, and what to do about it. Callers (node, command line)
show the message as is; the command line maps it to exit status 2.
"""

from __future__ import annotations


class ExtractionInputError(ValueError):
    """Bad input: wrong files, mismatched models, out-of-range options."""


class ExtractionInterrupted(RuntimeError):
    """The user stopped the run (Ctrl-C on the command line). No output file was written."""


class ExtractionStalled(RuntimeError):
    """No layer completed for longer than the stall bound; the message says which thread waits
    for what. No output file was written."""
