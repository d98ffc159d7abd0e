"""Fixtures of the benchmark tooling's tests: the product suite's (tests/conftest.py), shared, not copied."""

from tests.conftest import hloc, random_checkpoint, random_model, toronto_pair  # noqa: F401
