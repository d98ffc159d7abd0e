"""Match sampling: balanced (KDE) sampling as in RoMa v2, with bounded memory and explicit RNG.

The official sampler draws ``4 * num`` candidates proportionally to the overlap, estimates their
density with a Gaussian KDE (``std = 0.1`` in normalized 4-D match space, computed in half precision),
and draws ``num`` of them with probability ``1 / (1 + density)`` (``1e-7`` where the density is below
10). Three ways to compute that density:

* ``half=True`` (every official setting): the official half-precision numbers, bit for bit. On a CPU they are
  computed without the official ``N x N`` half-precision passes (:func:`_kde_density_half_cpu`): each
  half-precision kernel value is read from a table built with the official operations (it depends only on
  the half-precision squared distance), pairs whose distance makes it 0 in half precision are skipped, and
  rows whose float32 sum lies within ``2e-5`` (relative) of a half-precision rounding boundary, where the
  official summation order could round the other way, are summed again in the official order. Elsewhere (CUDA) the official operations run in
  row chunks (same numbers, memory ``chunk x N`` instead of ``N x N``).
* ``half=False``: float32, as one small matrix product and an in-place ``exp`` per chunk: more accurate than
  the half-precision sums (off by up to ~10 % where many matches crowd together), but no longer the official
  random draws.
* the grid density (:func:`kde_density_grid`, the ``tiny`` setting): candidates counted in cells of half a
  standard deviation, the counts smoothed with the Gaussian, each candidate reading its cell: ``O(N + cells)``
  instead of ``N x N`` kernel values, within a few percent of the float32 KDE; other random draws.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kde_density", "kde_density_grid", "balanced_sample", "resolve_generator"]

# A pair is skipped when its squared distance (float32) to a block's bounding box exceeds the first
# half-precision squared distance whose kernel value is 0 by this much; the float32 expansion of a squared
# distance between points in [-1, 1]^4 is off by less than 1e-5.
_SKIP_MARGIN = 2e-3
# Rows whose float32 sum lies within this relative distance of a half-precision rounding boundary are summed
# again the official way. torch's float32 cascade sum of non-negative terms (ours over the pairs kept, the
# official one over the whole row) stays within a few 1e-6 (relative) of the exact sum, so outside this
# margin both round to the same half-precision value.
_SUM_MARGIN = 2e-5
_LUTS: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor, float]] = {}


def resolve_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """An int seeds a fresh generator on ``device``; ``None`` uses torch's global RNG (like the official code)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(generator)
    return g


def kde_density(x: torch.Tensor, std: float = 0.1, *, half: bool = True, chunk_size: int = 2048) -> torch.Tensor:
    """Gaussian kernel density of each row of ``x (N, D)`` among all rows: ``(N,)``.

    ``half=True`` reproduces the official half-precision KDE (``float16``); ``half=False`` computes it in
    float32 (see the module docstring). Peak extra memory is about ``chunk_size * N`` elements instead of
    ``N * N``.
    """
    if not half:
        x = x.float()
        return _kde_float32(x, x, std, chunk_size)
    if x.device.type == "cpu" and x.shape[-1] == 4 and x.shape[0] > 0:
        return _kde_density_half_cpu(x, std, chunk_size)
    return _kde_density_half_official(x, std, chunk_size)


def _kde_density_half_official(x: torch.Tensor, std: float, chunk_size: int) -> torch.Tensor:
    """The official operations (``cdist``, ``**2``, ``/``, ``exp``, ``sum`` in half precision), in row chunks."""
    x = x.half()
    out = []
    for start in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[start : start + chunk_size], x)
        out.append((-(d**2) / (2 * std**2)).exp().sum(dim=-1))
    if not out:
        return x.new_zeros(0)
    return torch.cat(out)


def _half_kernel_table(std: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The official half-precision kernel value of every half-precision squared distance.

    The official KDE computes ``exp(-(sqrt(max(g, 0)))**2 / (2 std^2))`` elementwise in half precision from the
    half-precision ``g`` of ``cdist``'s matrix product, so the value depends only on ``g``'s 16 bits. Returns
    the table, indexed by those bits, in float32 and in half, and the smallest ``g >= 0`` from which every value is 0 (``inf`` if none).
    """
    key = (float(std), str(device))
    if key not in _LUTS:
        g = torch.arange(0, 1 << 16, dtype=torch.int32, device=device).to(torch.uint16).view(torch.float16)
        d = g.clamp_min(0).sqrt()
        e = (-(d**2) / (2 * std**2)).exp().nan_to_num(nan=0.0)  # NaN patterns: never produced
        finite = e[: 0x7C00]  # 0 <= g < inf, increasing
        nonzero = (finite != 0).nonzero()
        last = int(nonzero[-1, 0]) if len(nonzero) else -1
        zero_from = float(g[last + 1]) if last + 1 < len(finite) else float("inf")
        _LUTS[key] = (e.float(), e, zero_from)
    return _LUTS[key]


def _cdist_operands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cdist``'s half-precision operands ``[-2x, |x|^2, 1]`` and ``[x, 1, |x|^2]`` (as torch builds them for
    ``cdist(x, x)``), in float32 (exact): ``(N, 6)`` and ``(6, N)``."""
    sq = x.pow(2).sum(-1, keepdim=True)
    ones = torch.ones_like(sq)
    left = torch.cat((x.mul(-2), sq, ones), dim=-1).float()
    right = torch.cat((x, ones, sq), dim=-1).float().T.contiguous()
    return left, right


def _half_products(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left (r, 6) @ right (6, c)`` as torch's CPU half-precision matrix product computes it (products of
    half-precision values, exact in float32, added in order in float32, rounded to half), as int32 indices
    (the half-precision bits) into :func:`_half_kernel_table`. A float32 matrix product with 6 terms adds them
    in the same order (tests/test_sampling.py checks both against the half-precision product)."""
    return torch.mm(left, right).half().view(torch.uint16).int()


def _kde_density_half_cpu(x: torch.Tensor, std: float, chunk_size: int, leaf_size: int = 512) -> torch.Tensor:
    """The official half-precision KDE, bit for bit, without its ``N x N`` half-precision passes (CPU)."""
    xh = x.half()
    n = xh.shape[0]
    values, halves, zero_from = _half_kernel_table(std, xh.device)
    left, right = _cdist_operands(xh)
    # rows in blocks of nearby points (k-d tree leaves), stored block after block
    leaves = _leaves(xh.float(), leaf_size)
    order = torch.cat(leaves)
    xs, left_s, right_s = xh[order].float(), left[order], right[:, order]
    ends = torch.tensor([len(leaf) for leaf in leaves]).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    near = None
    if zero_from != float("inf"):
        # squared distance of every point to every block's bounding box: a pair farther than where the kernel
        # value becomes 0 in half precision contributes exactly 0
        lo = torch.stack([xs[s:e].amin(dim=0) for s, e in zip(starts, ends)])[:, None]
        hi = torch.stack([xs[s:e].amax(dim=0) for s, e in zip(starts, ends)])[:, None]
        d2 = ((lo - xs).clamp_min_(0).square_() + (xs - hi).clamp_min_(0).square_()).sum(-1)
        near = d2 < zero_from + _SKIP_MARGIN
    total = torch.zeros(n)
    for k, (s, e) in enumerate(zip(starts, ends)):
        r = right_s if near is None else right_s[:, near[k]]
        idx = _half_products(left_s[s:e], r)
        total[s:e] = values.index_select(0, idx.view(-1)).view(idx.shape).sum(-1)
    total = torch.empty_like(total).index_copy_(0, order, total).double()  # back to the input order
    dens = total.float().half()
    # the two rounding boundaries around each value: halfway to the neighbouring half-precision values
    bits = dens.view(torch.int16)
    below = ((bits - 1).view(torch.float16).double() + dens.double()) / 2
    above = ((bits + 1).view(torch.float16).double() + dens.double()) / 2
    unsure = (total <= below * (1 + _SUM_MARGIN)) | (total >= above * (1 - _SUM_MARGIN)) | (total > 6e4)
    redo = unsure.nonzero().squeeze(1)
    step = max(2, chunk_size)
    for start in range(0, len(redo), step):
        # summed again as the official code sums: full rows of half-precision values, float32 accumulation;
        # at least two rows (a single row is split across threads: another summation order)
        part = redo[start : start + step]
        rows = part if len(part) > 1 else part.repeat(2)
        e = halves.index_select(0, _half_products(left[rows], right).view(-1)).view(len(rows), n)
        dens[part] = e.sum(dim=-1)[: len(part)]
    return dens


def _leaves(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Index sets of at most ``size`` rows of ``x (N, D)`` that lie close together: the rows split at the
    median of their widest coordinate, recursively (a k-d tree's leaves)."""
    out, todo = [], [torch.arange(x.shape[0], device=x.device)]
    while todo:
        idx = todo.pop()
        if len(idx) <= size:
            out.append(idx)
            continue
        p = x[idx]
        dim = int((p.amax(dim=0) - p.amin(dim=0)).argmax())
        order = p[:, dim].argsort()
        half = len(idx) // 2
        todo += [idx[order[:half]], idx[order[half:]]]
    return out


def _kde_float32(x: torch.Tensor, y: torch.Tensor, std: float, chunk_size: int) -> torch.Tensor:
    """``sum_j exp(-|x_i - y_j|^2 / (2 std^2))`` over the rows ``y_j`` of ``y (M, D)``, for each row of ``x (N, D)``,
    with the squared distance expanded into one matrix product: ``c (|a|^2 + |b|^2 - 2 a.b)`` with
    ``c = -1 / (2 std^2)`` is ``[-2c a, c|a|^2, 1] . [b, 1, c|b|^2]``. The product is clamped at 0 (a squared
    distance is never negative) and exponentiated in one reused buffer."""
    n, m = x.shape[0], y.shape[0]
    if n == 0:
        return x.new_zeros(0)
    centre = y.mean(dim=0) if m else 0
    x, y = x - centre, y - centre  # distances do not change; smaller norms cancel less in the expansion
    c = -1.0 / (2 * std**2)
    sx = (x * x).sum(dim=-1, keepdim=True)
    sy = (y * y).sum(dim=-1, keepdim=True)
    left = torch.cat((x * (-2 * c), c * sx, torch.ones_like(sx)), dim=-1)
    right = torch.cat((y, torch.ones_like(sy), c * sy), dim=-1).T.contiguous()
    out = x.new_empty(n)
    buf = x.new_empty(min(chunk_size, n), m)
    for start in range(0, n, chunk_size):
        rows = left[start : start + chunk_size]
        e = buf[: rows.shape[0]]
        torch.mm(rows, right, out=e)
        e.clamp_(max=0).exp_()
        torch.sum(e, dim=-1, out=out[start : start + rows.shape[0]])
    return out


def kde_density_grid(x: torch.Tensor, std: float = 0.1, *, cells_per_std: int = 2, reach: float = 4.0) -> torch.Tensor:
    """Gaussian kernel density of each row of ``x (N, 4)`` among all rows, approximated on a grid: ``(N,)`` float32.

    The rows are counted in cells of side ``std / cells_per_std`` spanning their bounding box, the counts are
    smoothed with the Gaussian (separable: one small matrix product per dimension, truncated at ``reach``
    standard deviations) and each row reads its own cell. A row still counts itself once; the cost is
    ``O(N + cells)`` instead of ``N^2`` kernel values. With the default 2 cells per standard deviation the
    density of real matches is within ~4 % (median) of the exact float32 KDE (demo pair; tests/test_sampling.py
    bounds it on clustered points).
    """
    n, dims = x.shape
    if n == 0:
        return x.new_zeros(0, dtype=torch.float32)
    x = x.float()
    h = std / cells_per_std
    idx = ((x - x.amin(dim=0)) / h).round().long()
    sizes = (idx.amax(dim=0) + 1).tolist()
    flat = idx[:, 0]
    for d in range(1, dims):
        flat = flat * sizes[d] + idx[:, d]
    grid = torch.bincount(flat, minlength=math.prod(sizes)).float().view(sizes)
    r = math.ceil(reach * cells_per_std)
    for _ in range(dims):
        # the Gaussian along dimension 0 as a banded (L, L) matrix; the contracted dimension moves to the end,
        # so after one product per dimension the order is the original one
        pos = torch.arange(sizes[0], device=x.device, dtype=torch.float32)
        off = pos[:, None] - pos[None]
        band = torch.exp(-(off * h) ** 2 / (2 * std**2)) * (off.abs() <= r)
        grid = torch.tensordot(grid, band, dims=([0], [0]))
        sizes = sizes[1:] + sizes[:1]
    return grid.reshape(-1)[flat]


def balanced_sample(
    matches: torch.Tensor,
    confidence: torch.Tensor,
    num: int,
    *,
    extras: torch.Tensor | None = None,
    balanced: bool = True,
    half_precision_kde: bool = True,
    grid_kde: bool = False,
    expansion_factor: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw up to ``num`` matches.

    Args:
        matches: ``(N, 4)`` candidate matches ``(x_A, y_A, x_B, y_B)`` normalized.
        confidence: ``(N,)`` non-negative sampling weights (zero: never drawn).
        extras: optional ``(N, ...)`` per-match data gathered alongside (e.g. precisions).
        half_precision_kde: the official half-precision KDE (``True``) or the float32 one (see
            :func:`kde_density`).
        grid_kde: approximate the density on a grid (:func:`kde_density_grid`, float32); then
            ``half_precision_kde`` is not used.

    Returns:
        ``(M, 4)`` matches, ``(M,)`` confidences, gathered extras; ``M <= num``, and ``M`` is smaller when
        fewer than ``num`` candidates have non-zero weight (the official code raises there).
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    available = int((confidence > 0).sum())
    if available == 0:
        empty = matches.new_zeros((0, 4))
        return empty, confidence.new_zeros(0), None if extras is None else extras[:0]
    if not balanced:
        idx = torch.multinomial(confidence, min(num, available), replacement=False, generator=generator)
        return matches[idx], confidence[idx], None if extras is None else extras[idx]
    n_candidates = min(expansion_factor * num, available)
    idx = torch.multinomial(confidence, n_candidates, replacement=False, generator=generator)
    m, c = matches[idx], confidence[idx]
    e = None if extras is None else extras[idx]
    if grid_kde:
        density = kde_density_grid(m)
    else:
        density = kde_density(m, half=half_precision_kde)
    p = 1 / (density + 1)
    p[density < 10] = 1e-7
    keep = torch.multinomial(p, num_samples=min(num, len(c)), replacement=False, generator=generator)
    return m[keep], c[keep], None if e is None else e[keep]
