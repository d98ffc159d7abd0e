"""Shared fixtures: the shared data and upstream hloc (../shared), seeded official-layout checkpoints."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from cli_support import cli_double, cli_driver, cli_images, cli_no_model, cli_small_double  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TORONTO = (SHARED / "data" / "toronto_A.jpg", SHARED / "data" / "toronto_B.jpg")
MANIFEST = SHARED / "reference" / "romav2_state_dict_manifest.json"
# Upstream hloc (unmodified, see its SOURCE.txt): hloc is not on PyPI, so CI provides it beside the clone.
HLOC_SHARED = SHARED / "thirdparty" / "hloc"


def _shared_hloc_on_path() -> bool:
    """Without an installed hloc, import it from ../shared (in this process and in the tests' subprocesses).

    Runs when pytest loads this file, before any test module imports ``romav2_plugin`` (whose hloc
    registration needs hloc to be findable). An installed hloc, or a PYTHONPATH that already finds one
    (``.ci/run`` exports it), is left alone.
    """
    if importlib.util.find_spec("hloc") is not None or not (HLOC_SHARED / "hloc" / "__init__.py").is_file():
        return False
    sys.path.append(str(HLOC_SHARED))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(HLOC_SHARED)) if p
    )
    return True


HLOC_FROM_SHARED = _shared_hloc_on_path()


#: Fixtures that put a test in the slow lane wherever it is: the full-size (ViT-L) model with seeded random
#: weights, written once per session (a 1.2 GB state dict) and run at full size.
SLOW_FIXTURES = {"random_checkpoint", "random_model"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_SLOW_NOT_RUN: list[str] = []


def pytest_deselected(items) -> None:
    _SLOW_NOT_RUN.extend(item.nodeid for item in items if item.get_closest_marker("slow") is not None)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say what the fast lane (pyproject's default ``-m "not slow"``) left out and how to run it."""
    if _SLOW_NOT_RUN and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(
            f"fast lane: {len(_SLOW_NOT_RUN)} slow test(s) not run; `python -m pytest -m slow` runs them, "
            '`python -m pytest -m "slow or not slow"` runs everything'
        )


def pytest_report_header(config) -> str:
    spec = importlib.util.find_spec("hloc")
    where = "not found (hloc tests skip)" if spec is None else str(Path(spec.origin).parent)
    return f"hloc: {where}" + (
        " (../shared/thirdparty/hloc put on the path by conftest.py)" if HLOC_FROM_SHARED else ""
    )


@pytest.fixture(scope="session")
def hloc():
    """Upstream hloc. Skips only where there is none to test (not installed, no ../shared/thirdparty/hloc).

    With the shared copy present, a failing import (e.g. pycolmap or scipy missing from the environment) is
    an error, not a skip: CI must not silently stop testing the hloc adapter.
    """
    if importlib.util.find_spec("hloc") is None and not HLOC_SHARED.is_dir():
        pytest.skip("hloc is not installed and ../shared/thirdparty/hloc is absent")
    import hloc
    import pycolmap  # noqa: F401 - hloc's reconstruction / triangulation; hloc itself only warns without it

    return hloc


@pytest.fixture(scope="session")
def toronto_pair() -> tuple[Path, Path]:
    if not all(p.is_file() for p in TORONTO):
        pytest.skip("../shared/data/toronto_{A,B}.jpg not present")
    return TORONTO


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A complete official-layout checkpoint with seeded random weights (bf16 backbone, like the release)."""
    from romav2_plugin.testing import make_random_official_checkpoint

    path = tmp_path_factory.mktemp("weights") / "romav2_random.pt"
    make_random_official_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def random_model(random_checkpoint):
    from romav2_plugin import RoMaV2

    return RoMaV2.from_pretrained(random_checkpoint, setting="turbo", amp=False)
