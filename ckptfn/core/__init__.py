"""The pure core: records and decisions, no effects.

Everything under ``ckptfn/core/`` is pure in toolz's sense: outputs depend only on
inputs, inputs are never mutated, and nothing here touches files, the clock,
torch, the environment or the log. ``tests/core/test_purity.py`` enforces it by
parsing every module's imports against an allow-list.
"""
