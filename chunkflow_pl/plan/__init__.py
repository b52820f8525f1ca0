"""Planner: predicted memory and step time per ``(chunk.size, chunk.k)``, and a recommendation.

``python -m chunkflow_pl.plan [overrides]`` prints the table (``__main__.py``); ``chunk.size=auto`` in
``train.py`` uses the recommendation (``auto.py``). The predictions are in ``core.py``.
"""
