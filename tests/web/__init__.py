"""Tests of the front-end extension (``web/``)."""
