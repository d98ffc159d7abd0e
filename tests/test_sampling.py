"""Balanced sampling's KDE: the official half-precision one and the float32 one, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from romav2_plugin import RoMaV2
from romav2_plugin.config import SETTINGS, tiny_config
from romav2_plugin.sampling import balanced_sample, kde_density


def _reference(x: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    x = x.double()
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    return (-d2 / (2 * std**2)).exp().sum(-1)


def _points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # clustered like real matches: dense blobs (high density) and a uniform spread (low density)
    centres = torch.rand(8, 4, generator=g) * 2 - 1
    blob = centres[torch.randint(0, 8, (n // 2,), generator=g)] + 0.05 * torch.randn(n // 2, 4, generator=g)
    return torch.cat((blob, torch.rand(n - n // 2, 4, generator=g) * 2 - 1)).clamp(-1, 1)


@pytest.mark.parametrize("chunk_size", [7, 256, 2048])
def test_float32_kde_matches_float64_reference(chunk_size):
    x = _points(1500)
    ref = _reference(x)
    got = kde_density(x, half=False, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (1500,)
    # float32 tolerance: the expanded squared distance cancels a few ulps of |x|^2
    torch.testing.assert_close(got.double(), ref, rtol=5e-5, atol=0)
    assert ref.min() > 1 - 1e-9  # every point counts itself once: the clamp at distance 0 is exercised


def test_half_kde_is_the_less_accurate_one():
    x = _points(3000, seed=1)
    ref = _reference(x)
    err_half = ((kde_density(x, half=True).double() - ref).abs() / ref).max()
    err_f32 = ((kde_density(x, half=False).double() - ref).abs() / ref).max()
    assert err_f32 < 5e-5 and 100 * err_f32 < err_half < 0.25


def test_empty_input():
    assert kde_density(torch.zeros(0, 4), half=False).shape == (0,)
    assert kde_density(torch.zeros(0, 4), half=True).shape == (0,)


def test_float32_kde_sampling_is_reproducible_and_draws_candidates():
    x = _points(4000, seed=2)
    conf = torch.rand(4000, generator=torch.Generator().manual_seed(3))
    a = balanced_sample(x, conf, 500, half_precision_kde=False, generator=torch.Generator().manual_seed(5))
    b = balanced_sample(x, conf, 500, half_precision_kde=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[0].shape == (500, 4)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in a[0].tolist())


def test_settings_choose_the_kde():
    assert all(s.half_precision_kde for name, s in SETTINGS.items() if name != "tiny")  # the official draws
    assert SETTINGS["tiny"].half_precision_kde is False  # no official draws to reproduce


@pytest.mark.parametrize("setting, half", [("tiny", False), ("turbo", True)])
def test_model_sample_uses_the_setting_kde(monkeypatch, setting, half):
    import romav2_plugin.sampling as sampling

    seen = []
    real = sampling.kde_density

    def spy(x, *args, **kwargs):
        seen.append(kwargs.get("half"))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(sampling, "kde_density", spy)
    torch.manual_seed(0)
    model = RoMaV2(tiny_config(), setting=setting).eval()
    H = W = 16
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, W), torch.linspace(-1, 1, H), indexing="xy"), -1)
    preds = {"warp_AB": grid[None], "overlap_AB": torch.ones(1, H, W, 1)}
    m = model.sample(preds, 50, generator=0)[0]
    assert seen == [half] and m.shape == (50, 4)
