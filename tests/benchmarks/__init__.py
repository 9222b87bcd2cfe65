"""Benchmarks of ckptfn: one table of side-by-side ratios (``python tests/benchmarks/run.py``)."""
