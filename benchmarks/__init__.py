"""Benchmarks: speed ratios against a baseline measured in the same run (never timed asserts)."""
