"""Benchmark suite: `pytest bench --benchmark-only` (never part of `pytest tests`). See bench/README.md."""
