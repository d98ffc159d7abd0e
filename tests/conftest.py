"""Shared fixtures: devices/dtypes, tolerances, seeded official-layout checkpoints, the shared image pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TORONTO = (SHARED / "data" / "toronto_A.jpg", SHARED / "data" / "toronto_B.jpg")
MANIFEST = SHARED / "reference" / "romav2_state_dict_manifest.json"

# Tolerance table per dtype: (atol, rtol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def tol():
    def get(dtype: torch.dtype) -> dict[str, float]:
        atol, rtol = TOLERANCES[dtype]
        return {"atol": atol, "rtol": rtol}

    return get


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
