"""Tests of the report charts (``charts/``)."""
