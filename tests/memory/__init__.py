"""Tests of the V2 engine (``memory/``): planning, staging, streaming, rolling schedule, its faults."""
