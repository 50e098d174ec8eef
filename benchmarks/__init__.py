"""Measuring programs, run from a checkout (`python -m benchmarks.benchmark ...`) and not installed
with the package (pyproject.toml installs msca_jax only); docs/performance.md has what they measured."""
