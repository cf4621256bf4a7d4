"""Tests of the size budget (``extract/budget/``): the allocator, target sizes, the size objective."""
