"""A size budget: the rank math (``rank_math``, ``allocate``), the passes over the model
(``passes``), the loop that runs them (``loop``) and the shape-only fit check (``fit_check``).

Kept empty so that importing the math (the config validates a target size) loads no pass.
"""
