"""Fixtures of the benchmark tooling's tests: the product suite's (tests/conftest.py), shared, not copied."""

import sys
from pathlib import Path

# tests/conftest.py imports its helper modules (cli_support) the way pytest runs it, from tests/ on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from tests.conftest import hloc, random_checkpoint, random_model, toronto_pair  # noqa: E402, F401
