"""Helpers shared by the tests (no tests here except those of the helpers themselves)."""
