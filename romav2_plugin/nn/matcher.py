"""Coarse matcher: multi-view ViT-B, attention matching against a Fourier grid embedding, DPT head.

For a pair of backbone feature lists (two layers, ``(B, h, w, 1024)`` each) it predicts the coarse warp
``A -> B`` (and ``B -> A`` when bidirectional) at stride 4:

1. both views' concatenated features ``(B, 2, h, w, 2048)`` go through the multi-view transformer;
2. each position of A attends (single head, cosine similarity / temperature 0.1) over all positions
   of B, and reads out B's Fourier position embedding ``[sin(scale * omega x), cos(scale * omega x)]``;
3. the DPT head turns ``[f_A^11, f_A^17 + f_mv_A + match_emb]`` into warp ``(B, 4h, 4w, 2)`` (normalized
   ``[-1, 1]``) and an overlap logit ``(B, 4h, 4w, 1)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from romav2_plugin.config import MatcherConfig
from romav2_plugin.geometry import normalized_grid
from romav2_plugin.nn.dpt import DPTHead
from romav2_plugin.nn.vit import MultiViewTransformer
from romav2_plugin.profiling import stage

__all__ = ["Matcher"]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class Matcher(nn.Module):
    def __init__(self, cfg: MatcherConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MatcherConfig()
        self.cfg = cfg
        self.omega = nn.Buffer(2 * torch.pi * torch.randn(cfg.out_dim // 2, 2))
        self.scale = nn.Buffer(torch.tensor(cfg.scale))  # int64 in the checkpoint
        self.temp = nn.Buffer(torch.tensor(cfg.temperature))
        self.mv_vit = MultiViewTransformer(
            in_dim=cfg.feat_dim * cfg.num_feature_layers,
            out_dim=cfg.out_dim,
            dim=cfg.vit_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_heads,
            mlp_ratio=cfg.vit_mlp_ratio,
            rope_base=cfg.rope_base,
        )
        self.head = DPTHead(
            dim_in=cfg.out_dim,
            out_dim=cfg.warp_dim + cfg.confidence_dim,
            features=cfg.dpt_features,
            out_channels=cfg.dpt_out_channels,
            down_ratio=cfg.dpt_down_ratio,
        )

    def position_embedding(self, B: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Fourier embedding of B's pixel-centre grid: ``(B, h, w, out_dim)`` float32."""
        x = normalized_grid(B, h, w, device=device).reshape(B, h * w, 2)
        x_emb = F.linear(x, self.scale * self.omega).reshape(B, h, w, -1)
        return torch.cat((x_emb.sin(), x_emb.cos()), dim=-1)

    def attention_logits(self, f_A: torch.Tensor, f_B: torch.Tensor) -> torch.Tensor:
        """Single-head A->B attention logits (cosine similarity / temperature).

        Args:
            f_A, f_B: ``(B, h, w, D)`` float32 multi-view features.

        Returns:
            ``(B, h*w, h*w)``: row ``i`` (A token, row-major) over the tokens of B.
        """
        B, h, w, D = f_A.shape
        sim = torch.bmm(_normalize(f_A).reshape(B, h * w, D), _normalize(f_B).reshape(B, h * w, D).mT)
        return (1 / self.temp) * sim

    def match_embedding(
        self, f_A: torch.Tensor, f_B: torch.Tensor, pos_emb_B: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft-argmax of B's position embedding under A->B attention.

        Args:
            f_A, f_B: ``(B, h, w, D)`` float32 multi-view features.
            pos_emb_B: ``(B, h, w, E)``.
            logits: :meth:`attention_logits` if already computed.

        Returns:
            ``(B, h, w, E)``.
        """
        B, h, w, D = f_A.shape
        attn = torch.softmax(self.attention_logits(f_A, f_B) if logits is None else logits, dim=2)
        return torch.bmm(attn, pos_emb_B.reshape(B, h * w, -1)).reshape(B, h, w, -1)

    def forward(
        self,
        f_list_A: list[torch.Tensor],
        f_list_B: list[torch.Tensor],
        *,
        bidirectional: bool,
        amp: bool = False,
        return_attention: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Coarse warps.

        Args:
            f_list_A, f_list_B: backbone layers, each ``(B, h, w, feat_dim)``.
            return_attention: also return the attention logits (for the matcher's NLL loss in training).

        Returns:
            ``warp_AB (B, 4h, 4w, 2)``, ``confidence_AB (B, 4h, 4w, 1)`` and the ``_BA`` ones (``None``
            when not bidirectional); with ``return_attention``, ``attention_AB`` / ``attention_BA``
            ``(B, h*w, h*w)`` logits.
        """
        f_A = torch.cat(f_list_A, dim=-1)
        f_B = torch.cat(f_list_B, dim=-1)
        B, h, w, D = f_A.shape
        if f_B.shape != f_A.shape:
            raise ValueError(f"Both views must have the same feature shape, got {tuple(f_A.shape)} and {tuple(f_B.shape)}")
        if D != self.cfg.feat_dim * self.cfg.num_feature_layers:
            raise ValueError(f"Expected {self.cfg.feat_dim * self.cfg.num_feature_layers} feature channels, got {D}")
        pos_emb = self.position_embedding(B, h, w, f_A.device)
        ctx = torch.autocast(f_A.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            f_mv = self.mv_vit(torch.stack((f_A, f_B), dim=1))
        f_mv_A, f_mv_B = f_mv[:, 0].float(), f_mv[:, 1].float()

        # Both directions go through the DPT head as one batch of 2B (exact: the head is per-sample).
        f_lists = [f_list_A] + ([f_list_B] if bidirectional else [])
        f_mvs = [(f_mv_A, f_mv_B)] + ([(f_mv_B, f_mv_A)] if bidirectional else [])
        logits = [self.attention_logits(f_mv_X, f_mv_Y) for f_mv_X, f_mv_Y in f_mvs]
        tokens = []
        for i in range(len(f_list_A)):
            parts = []
            for f_list, (f_mv_X, f_mv_Y), lg in zip(f_lists, f_mvs, logits):
                t = f_list[i]
                if i == len(f_list_A) - 1:
                    t = t + f_mv_X + self.match_embedding(f_mv_X, f_mv_Y, pos_emb, lg)
                parts.append(t)
            tokens.append(torch.cat(parts, dim=0))
        with stage("romav2.dpt"):
            out = self.head(tokens, amp=amp)
        warp, conf = out[..., : self.cfg.warp_dim], out[..., self.cfg.warp_dim :]
        warp_AB, conf_AB = warp[:B], conf[:B]
        warp_BA = conf_BA = None
        if bidirectional:
            warp_BA, conf_BA = warp[B:], conf[B:]
        out = {"warp_AB": warp_AB, "confidence_AB": conf_AB, "warp_BA": warp_BA, "confidence_BA": conf_BA}
        if return_attention:
            out["attention_AB"] = logits[0]
            out["attention_BA"] = logits[1] if bidirectional else None
        return out
