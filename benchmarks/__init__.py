"""Benchmarks: speed ratios against a baseline measured in the same run (never timed asserts)."""

import mechvis  # noqa: F401  first, before torch: it sets how OpenMP threads wait (README "Thread waiting")
