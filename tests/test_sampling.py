"""Balanced sampling's KDE: the official half-precision one (bit for bit against the official operations), the
float32 one and the grid density, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from romav2_plugin import RoMaV2
from romav2_plugin.config import SETTINGS, tiny_config
from romav2_plugin.sampling import balanced_sample, kde_density, kde_density_grid


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
    assert not any(s.grid_kde for name, s in SETTINGS.items() if name != "tiny")
    assert SETTINGS["tiny"].half_precision_kde is False  # no official draws to reproduce
    assert SETTINGS["tiny"].grid_kde is True  # sampling a small part of matching
    assert all(s.precise_fraction == 1.0 for name, s in SETTINGS.items() if name != "tiny")  # every candidate
    assert SETTINGS["tiny"].precise_fraction == 0.3  # chosen on training-photo validation pairs


@pytest.mark.parametrize("setting, half", [("tiny", "grid"), ("turbo", True)])
def test_model_sample_uses_the_setting_kde(monkeypatch, setting, half):
    import romav2_plugin.sampling as sampling

    seen = []
    real, real_grid = sampling.kde_density, sampling.kde_density_grid

    def spy(x, *args, **kwargs):
        seen.append(kwargs.get("half"))
        return real(x, *args, **kwargs)

    def spy_grid(x, *args, **kwargs):
        seen.append("grid")
        return real_grid(x, *args, **kwargs)

    monkeypatch.setattr(sampling, "kde_density", spy)
    monkeypatch.setattr(sampling, "kde_density_grid", spy_grid)
    torch.manual_seed(0)
    model = RoMaV2(tiny_config(), setting=setting).eval()
    H = W = 16
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, W), torch.linspace(-1, 1, H), indexing="xy"), -1)
    preds = {"warp_AB": grid[None], "overlap_AB": torch.ones(1, H, W, 1),
             "precision_AB": torch.eye(2).expand(1, H, W, 2, 2)}  # tiny's precise_fraction needs precisions
    m = model.sample(preds, 50, generator=0)[0]
    assert seen == [half] and m.shape == (50, 4)


# ---------------------------------------------------------------- the official half-precision KDE on a CPU
def _official_half_kde(x: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    """The official ``kde`` of romav2 2.0.1 as written there (whole ``N x N`` matrix, half precision)."""
    x = x.half()
    return (-(torch.cdist(x, x) ** 2) / (2 * std**2)).exp().sum(dim=-1)


@pytest.mark.parametrize("n, seed", [(1500, 4), (2600, 5)])
def test_cpu_half_kde_is_the_official_one_bit_for_bit(n, seed):
    x = _points(n, seed)
    # exact duplicates and near-duplicates: squared distances that round below 0 in the expansion
    x = torch.cat((x, x[:50], x[50:100] + 1e-4))
    got = kde_density(x, half=True)
    want = _official_half_kde(x)
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_cpu_half_kde_resums_rows_near_a_rounding_boundary(monkeypatch):
    """With a margin so wide that every row counts as near a boundary, every row is summed again the official
    way (full rows, float32 accumulation) and the result is still the official one."""
    import romav2_plugin.sampling as sampling

    x = _points(900, seed=6)
    monkeypatch.setattr(sampling, "_SUM_MARGIN", 1.0)
    assert torch.equal(kde_density(x, half=True).view(torch.int16), _official_half_kde(x).view(torch.int16))


def test_half_products_add_in_the_order_of_the_half_precision_product():
    """``_half_products`` (a float32 product of six terms) rounds like the half-precision product that ``cdist``
    runs in the official KDE (checked through ``cdist`` itself); adding the same terms exactly would not."""
    from romav2_plugin.sampling import _cdist_operands, _half_products

    x = _points(700, seed=7).half()
    left, right = _cdist_operands(x)
    want = torch.cdist(x, x)
    got = _half_products(left, right).to(torch.int16).view(torch.float16)
    assert torch.equal(got.clamp_min(0).sqrt(), want)
    exact = (left.double() @ right.double()).half()
    assert not torch.equal(exact.clamp_min(0).sqrt(), want)  # the order matters: the test can tell


def test_half_kernel_table_is_the_official_elementwise_chain():
    from romav2_plugin.sampling import _half_kernel_table

    values, halves, zero_from = _half_kernel_table(0.1, torch.device("cpu"))
    g = torch.rand(5000, generator=torch.Generator().manual_seed(8)).half() * 0.5
    want = (-(g.clamp_min(0).sqrt() ** 2) / (2 * 0.1**2)).exp()
    bits = g.view(torch.int16).long()
    assert torch.equal(halves[bits], want) and torch.equal(values[bits], want.float())
    # from zero_from on every value is 0, just below it one is not
    finite = torch.arange(0, 0x7C00).to(torch.int16).view(torch.float16)
    assert bool((halves[: 0x7C00][finite >= zero_from] == 0).all())
    assert halves[int((finite < zero_from).nonzero()[-1])] > 0
    assert halves[0x8001] == 1  # a negative squared distance is clamped to 0, as cdist does


# ---------------------------------------------------------------- grid density (non-official settings)
def test_grid_density_is_close_to_the_float32_kde():
    x = _points(3000, seed=9)
    ref = _reference(x)
    got = kde_density_grid(x)
    assert got.dtype == torch.float32 and got.shape == (3000,)
    rel = (got.double() - ref).abs() / ref
    assert rel.median() < 0.06 and rel.quantile(0.9) < 0.2  # measured 0.050 and 0.160
    # an isolated point counts itself once
    lone = torch.cat((torch.zeros(1, 4), torch.full((10, 4), 0.9)))
    assert abs(float(kde_density_grid(lone)[0]) - 1.0) < 1e-6
    assert kde_density_grid(torch.zeros(0, 4)).shape == (0,)


def test_grid_sampler_balances_density_and_prefers_confident_matches():
    """Seeded; drawn from the candidates; a tight blob holding half the candidates (density ~10x that of a wide
    blob holding the other half) gets far less than half of the draws, about as with the float32 KDE sampler;
    and within the wide blob the more confident matches are drawn more often."""
    g = torch.Generator().manual_seed(10)
    tight = 0.3 + 0.02 * torch.randn(4000, 4, generator=g)
    wide = -0.2 + 0.15 * torch.randn(4000, 4, generator=g)
    x = torch.cat((tight, wide))
    conf = torch.cat((torch.full((4000,), 0.5), torch.where(torch.arange(4000) < 2000, 0.9, 0.3)))

    def draw(grid, seed):
        return balanced_sample(x, conf, 500, grid_kde=grid, half_precision_kde=False,
                               generator=torch.Generator().manual_seed(seed))

    a, b = draw(True, 11), draw(True, 11)
    assert torch.equal(a[0], b[0]) and a[0].shape == (500, 4)
    index = {tuple(r): i for i, r in enumerate(x.tolist())}
    assert all(tuple(r) in index for r in a[0].tolist())
    picked = torch.tensor([index[tuple(r)] for r in a[0].tolist()])
    ref = torch.tensor([index[tuple(r)] for r in draw(False, 11)[0].tolist()])
    in_tight, ref_in_tight = float((picked < 4000).float().mean()), float((ref < 4000).float().mean())
    assert in_tight < 0.25 and abs(in_tight - ref_in_tight) < 0.08
    wide_picked = picked[picked >= 4000] - 4000
    assert float((wide_picked < 2000).float().mean()) > 0.6  # confidence 0.9 against 0.3


# ---------------------------------------------------------------- precise_fraction: drawing the most precise
def _spd(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
    return (A @ A.transpose(-1, -2) + 0.05 * torch.eye(2, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_largest_sigma_matches_float64_eigenvalues(dtype, rtol):
    from romav2_plugin.geometry import largest_sigma

    P = _spd(200, dtype=dtype)
    want = torch.linalg.eigvalsh(P.double())[:, 0].rsqrt()
    got = largest_sigma(P)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    # not positive definite -> inf; NaN stays NaN
    odd = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[float("nan")] * 2] * 2], dtype=dtype)
    out = largest_sigma(odd)
    assert torch.isinf(out[:2]).all() and torch.isnan(out[2])


def test_precise_candidates_keeps_the_smallest_uncertainties():
    from romav2_plugin.geometry import largest_sigma
    from romav2_plugin.postprocess import precise_candidates

    n = 101
    P_B = _spd(n, seed=1, dtype=torch.float32)
    nan = torch.full_like(P_B, float("nan"))
    prec = torch.stack((nan, P_B), dim=1)  # one direction: the A side is unknown
    sigma = largest_sigma(P_B)
    for fraction in (0.3, 0.5, 1.0):
        keep = precise_candidates(prec, fraction)
        k = int(torch.tensor(fraction * n).ceil())
        assert int(keep.sum()) == k
        assert sigma[keep].max() <= sigma[~keep].min() if fraction < 1 else bool(keep.all())
    # both sides predicted: the less certain side decides
    P_A = _spd(n, seed=2, dtype=torch.float32)
    both = torch.stack((P_A, P_B), dim=1)
    worst = torch.maximum(largest_sigma(P_A), sigma)
    keep = precise_candidates(both, 0.2)
    assert int(keep.sum()) == 21 and worst[keep].max() <= worst[~keep].min()
    # a matrix that is not positive definite is never kept
    bad = prec.clone()
    bad[0, 1] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    assert not precise_candidates(bad, 1.0)[0] and precise_candidates(bad, 1.0)[1:].all()


def test_precise_fraction_errors_name_the_problem():
    from romav2_plugin.config import MatchSetting
    from romav2_plugin.postprocess import precise_candidates, sample_matches

    with pytest.raises(ValueError, match="precise_fraction must be in \\(0, 1\\], got 0"):
        MatchSetting(256, 256, precise_fraction=0.0)
    with pytest.raises(ValueError, match="got 1.5"):
        precise_candidates(torch.ones(3, 2, 2, 2), 1.5)
    H = W = 8
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, W), torch.linspace(-1, 1, H), indexing="xy"), -1)
    preds = {"warp_AB": grid[None], "overlap_AB": torch.ones(1, H, W, 1)}  # no precision_AB
    with pytest.raises(ValueError, match="lack.*precise_fraction = 1.0"):
        sample_matches(preds, 10, precise_fraction=0.5)
    assert sample_matches(preds, 10, generator=0)[0].shape == (10, 4)  # 1.0 needs no precisions
    with pytest.raises(ValueError, match="got 1.5"):  # a model attribute set out of range is not ignored
        sample_matches(preds, 10, precise_fraction=1.5)


def test_model_sample_draws_only_the_precise_fraction():
    """Through ``RoMaV2.sample``: with the setting's ``precise_fraction`` every drawn match is among the most
    precise candidates; at 1.0 the draws are exactly those of the official sampler's path."""
    from romav2_plugin.geometry import largest_sigma, precision_matrix
    from romav2_plugin.postprocess import sample_matches

    torch.manual_seed(0)
    model = RoMaV2(tiny_config(), setting="tiny").eval()
    assert model.precise_fraction == SETTINGS["tiny"].precise_fraction
    H = W = 24
    g = torch.Generator().manual_seed(4)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, W), torch.linspace(-1, 1, H), indexing="xy"), -1)
    warp = (grid + 0.01 * torch.randn(H, W, 2, generator=g))[None]
    params = torch.stack((torch.rand(H, W, generator=g) * 4 + 0.1, torch.zeros(H, W), torch.rand(H, W, generator=g) * 4 + 0.1), -1)
    prec = precision_matrix(params)[None]
    preds = {"warp_AB": warp, "overlap_AB": torch.rand(1, H, W, 1, generator=g) * 0.9 + 0.1, "precision_AB": prec}
    sigma = largest_sigma(prec[0]).reshape(-1)
    cut = sigma.kthvalue(int(torch.tensor(0.3 * H * W).ceil())).values
    model.precise_fraction = 0.3
    m, c, _, pB = model.sample(preds, 100, generator=1)
    assert 0 < len(m) <= 100 and bool((largest_sigma(pB) <= cut).all())
    model.precise_fraction = 1.0
    m1 = model.sample(preds, 100, generator=1)[0]
    m_ref = sample_matches(preds, 100, generator=1, half_precision_kde=model.half_precision_kde)[0]
    assert torch.equal(m1, m_ref) and bool((largest_sigma(model.sample(preds, 300, generator=2)[3]) > cut).any())
