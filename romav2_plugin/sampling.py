"""Match sampling: balanced (KDE) sampling as in RoMa v2, with bounded memory and explicit RNG.

The official sampler draws ``4 * num`` candidates proportionally to the overlap, estimates their
density with a Gaussian KDE (``std = 0.1`` in normalized 4-D match space, computed in half precision),
and draws ``num`` of them with probability ``1 / (1 + density)`` (``1e-7`` where the density is below
10). The KDE here is computed in row chunks (same numbers, memory ``chunk x N`` instead of ``N x N``).
"""

from __future__ import annotations

import torch

__all__ = ["kde_density", "balanced_sample", "resolve_generator"]


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

    ``half=True`` reproduces the official half-precision KDE. Peak extra memory is
    ``chunk_size * N`` elements instead of ``N * N``.
    """
    if half:
        x = x.half()
    out = []
    for start in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[start : start + chunk_size], x)
        out.append((-(d**2) / (2 * std**2)).exp().sum(dim=-1))
    if not out:
        return x.new_zeros(0)
    return torch.cat(out)


def balanced_sample(
    matches: torch.Tensor,
    confidence: torch.Tensor,
    num: int,
    *,
    extras: torch.Tensor | None = None,
    balanced: bool = True,
    expansion_factor: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw up to ``num`` matches.

    Args:
        matches: ``(N, 4)`` candidate matches ``(x_A, y_A, x_B, y_B)`` normalized.
        confidence: ``(N,)`` non-negative sampling weights (zero: never drawn).
        extras: optional ``(N, ...)`` per-match data gathered alongside (e.g. precisions).

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
    density = kde_density(m)
    p = 1 / (density + 1)
    p[density < 10] = 1e-7
    keep = torch.multinomial(p, num_samples=min(num, len(c)), replacement=False, generator=generator)
    return m[keep], c[keep], None if e is None else e[keep]
