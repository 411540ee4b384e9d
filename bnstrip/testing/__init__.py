"""Models for tests, benchmarks and `--arch bnstrip.testing.zoo:...` examples; never imported by the engine.

The layer contract in pyproject.toml keeps it that way (`testing` sits beside `cli`, above everything else).
"""
