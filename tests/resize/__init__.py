"""Tests of the resizer (``resize/``): key mapping, scoring, whole-file resize, merge and conversion."""
