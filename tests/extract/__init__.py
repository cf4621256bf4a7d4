"""Tests of the extraction core (``extract/``): per-layer numerics, rank rules, sources, the V1 pipeline."""
