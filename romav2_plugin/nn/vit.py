"""Multi-view ViT-B used by the matcher.

Tokens of both views are processed together. Blocks alternate between *joint* attention over the
``2 * H * W`` tokens of both views (even blocks, no positional encoding) and *per-view* attention with
axial 2-D RoPE (odd blocks). As in the official model, the RoPE periods, angles and the rotation of
queries and keys are computed in bfloat16 (the checkpoint stores ``rope_embed.periods`` in bf16), whatever
the dtype of the rest of the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from romav2_plugin.nn.linear import linear

__all__ = ["RopeEmbedding", "MultiViewTransformer"]


class RopeEmbedding(nn.Module):
    """Axial RoPE with ``periods = base ** (2 i / (D_head / 2))``, ``i < D_head / 4`` (stored in bf16).

    ``forward(H, W)`` returns ``(sin, cos)``, each ``(H * W, D_head)`` in bf16, for token coordinates
    at pixel centres normalised separately per axis to ``[-1, 1]``.
    """

    def __init__(self, head_dim: int, base: float = 100.0, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.rope_dtype = dtype
        n = head_dim // 4
        periods = base ** (2 * torch.arange(n, dtype=dtype) / (head_dim // 2))
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, H: int, W: int, *, emulate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)`` tables.

        ``emulate``: compute in float32, rounding to the RoPE dtype after every operation (the result, held
        in float32, equals the low-precision one: eager CPU bf16 arithmetic is float32 arithmetic rounded
        per operation). ONNX runtimes lack bf16 kernels for these operations. Default: while exporting.
        """
        if emulate is None:
            emulate = self.rope_dtype != torch.float32 and torch.compiler.is_exporting()
        if emulate:
            rnd = _rounder(self.rope_dtype)
            dd = {"device": self.periods.device, "dtype": torch.float32}
        else:
            rnd = _identity
            dd = {"device": self.periods.device, "dtype": self.rope_dtype}
        ch = rnd(rnd(torch.arange(0.5, H, **dd)) / H)
        cw = rnd(rnd(torch.arange(0.5, W, **dd)) / W)
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2) as (y, x)
        coords = rnd(rnd(2.0 * coords) - 1.0)
        periods = self.periods.to(dd["dtype"])
        angles = rnd(rnd(2 * math.pi * coords[:, :, None]) / periods[None, None, :])
        angles = angles.flatten(1, 2).tile(2)  # (HW, D_head)
        return rnd(torch.sin(angles)), rnd(torch.cos(angles))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rounder(dtype: torch.dtype):
    def rnd(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).float()

    return rnd


#: ``(sin, cos, emulated dtype or None)`` passed to the RoPE blocks
Rope = tuple[torch.Tensor, torch.Tensor, "torch.dtype | None"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, *, emulate: torch.dtype | None = None
) -> torch.Tensor:
    """Rotate ``x (B, heads, N, D_head)`` in the dtype of ``sin``/``cos``; returns ``x.dtype``.

    ``emulate``: the low-precision dtype to emulate in float32 (``sin``/``cos`` from
    ``RopeEmbedding(..., emulate=True)``), rounding after every operation as eager CPU arithmetic does.
    """
    dtype = x.dtype
    if emulate is not None:
        rnd = _rounder(emulate)
        xr = rnd(x)
        return rnd(rnd(xr * cos) + rnd(_rotate_half(xr) * sin)).to(dtype)
    xr = x.to(sin.dtype)
    return (xr * cos + _rotate_half(xr) * sin).to(dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = linear(x, self.qkv).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if rope is not None:
            sin, cos, emulate = rope
            q = apply_rope(q, sin, cos, emulate=emulate)
            k = apply_rope(k, sin, cos, emulate=emulate)
        out = F.scaled_dot_product_attention(q, k, v)
        return linear(out.transpose(1, 2).reshape(B, N, C), self.proj)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, "gelu"), self.fc2)  # self.act's GELU, fused into fc1 where it can be


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, no LayerScale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class MultiViewTransformer(nn.Module):
    """Two-view transformer.

    Forward:
        x: ``(B, 2, H, W, in_dim)`` coarse features of both views.

    Returns:
        ``(B, 2, H, W, out_dim)``.
    """

    def __init__(
        self, *, in_dim: int, out_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, rope_base: float
    ) -> None:
        super().__init__()
        self.projector = nn.Linear(in_dim, dim)
        self.output_projector = nn.Linear(dim, out_dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.rope_embed = RopeEmbedding(dim // num_heads, base=rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, V, H, W, _ = x.shape
        x = linear(x.flatten(1, -2), self.projector)  # (B, V*H*W, dim)
        # While exporting (ONNX), bf16 RoPE arithmetic is emulated in float32 (same numbers, see RopeEmbedding).
        low = self.rope_embed.rope_dtype
        emulate = low if low != torch.float32 and torch.compiler.is_exporting() else None
        rope = (*self.rope_embed(H, W, emulate=emulate is not None), emulate)
        D = x.shape[-1]
        for idx, blk in enumerate(self.blocks):
            if idx % 2 == 1:  # per-view attention with RoPE
                x = blk(x.reshape(B * V, H * W, D), rope).reshape(B, V * H * W, D)
            else:  # joint attention over both views
                x = blk(x, None)
        x = linear(self.norm(x), self.output_projector)
        return x.reshape(B, V, H, W, -1)
