"""``python -m benchmarks.accuracy``: see :mod:`benchmarks.accuracy.command`."""

import sys

from benchmarks.accuracy.command import run

sys.exit(run())
