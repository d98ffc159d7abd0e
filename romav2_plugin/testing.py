"""Test helpers that users can reuse: seeded random weights in the official checkpoint layout.

No weights can be downloaded in CI, so tests build a complete ``romav2.0.1.pt``-shaped file from a
seeded, randomly initialised model: every key, shape and dtype of the release (backbone in bf16,
including the unused blocks 18-23, ``mask_token``, the k-bias mask and RoPE periods).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["make_random_official_state_dict", "make_random_official_checkpoint"]


def make_random_official_state_dict(seed: int = 0, *, k_bias_scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random weights with exactly the official layout.

    The masked key biases are filled with non-zero values (the mask must make them irrelevant), the
    BatchNorm running statistics are randomised so that eval-mode normalisation is exercised.
    """
    from romav2_plugin.backbone import _create_timm_vit
    from romav2_plugin.config import BackboneConfig
    from romav2_plugin.model import RoMaV2
    from romav2_plugin.weights import internal_to_official, official_layout

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RoMaV2(amp=False)
        full = _create_timm_vit(BackboneConfig())  # all 24 blocks, for the unused ones
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    # LayerScale gammas init to ~1e-5 in timm, which would make the backbone an identity; use O(0.1).
    for name, p in list(model.f.named_parameters()) + list(full.named_parameters()):
        if "gamma" in name:
            p.data.copy_(0.1 + 0.05 * torch.randn(p.shape, generator=gen))
    n_used = model.f.num_blocks
    own = model.state_dict()
    for k, v in full.state_dict().items():  # share the used blocks so the file is self-consistent
        m = k.split(".")
        if m[0] == "blocks" and int(m[1]) < n_used:
            continue
        if k.startswith("blocks."):
            own["f.vit." + k] = v
    extra = {
        "f.mask_token": torch.randn(1, full.embed_dim, generator=gen),
        "f.rope_embed.periods": 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32),
    }
    sd = internal_to_official(own, extra_backbone=extra)
    for k in list(sd):
        if k.endswith("attn.qkv.bias"):
            d = sd[k].shape[0] // 3
            sd[k][d : 2 * d] = k_bias_scale * torch.randn(d, generator=gen)
    layout = official_layout(model)
    out = {}
    for k, (shape, dtype) in layout.items():
        v = sd[k]
        assert tuple(v.shape) == shape, (k, v.shape, shape)
        out[k] = v.detach().to(dtype).clone()
    if not all(math.isfinite(float(v.float().abs().max())) for v in out.values() if v.numel()):
        raise RuntimeError("non-finite random weights")
    return out


def make_random_official_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write :func:`make_random_official_state_dict` to ``path`` (``torch.save``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_random_official_state_dict(seed), path)
    return path


class HomographyWarpDouble(torch.nn.Module):
    """Test double for the *network only*: ``match()`` returns the exact dense warp of a known homography.

    Everything downstream of the network (sampling, pixel conversion, adapters) is the real code of
    :class:`~romav2_plugin.RoMaV2`, so coordinate-convention bugs in it show up as errors against ``H``.

    Args:
        H: ``(3, 3)`` homography mapping pixel coordinates of A to pixel coordinates of B, both in the
            OpenCV convention (top-left pixel centre at ``(0, 0)``).
        setting: which preset's working resolution (and bidirectionality) to mimic.
    """

    def __init__(self, H, setting: str = "turbo") -> None:
        super().__init__()
        from romav2_plugin.model import RoMaV2

        self.H = torch.as_tensor(H, dtype=torch.float64)
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.amp = False
        RoMaV2.apply_setting(self, setting)  # sets H_lr, W_lr, H_hr, W_hr, bidirectional, ...

    # real post-processing of the model
    from romav2_plugin.model import RoMaV2 as _M

    apply_setting = _M.apply_setting
    sample = _M.sample
    grid_matches = _M.grid_matches
    _candidates = _M._candidates
    to_pixel_coordinates = staticmethod(_M.to_pixel_coordinates)
    match_keypoints = staticmethod(_M.match_keypoints)
    del _M

    @property
    def device(self) -> torch.device:
        return self._dummy.device

    @staticmethod
    def _warp(Hm: torch.Tensor, h: int, w: int, size_A: tuple[int, int], size_B: tuple[int, int]):
        from romav2_plugin.geometry import normalized_grid, to_normalized, to_pixel

        grid = normalized_grid(1, h, w, dtype=torch.float64)[0]
        pix = to_pixel(grid, *size_A, pixel_center=0.0)
        ph = torch.cat((pix, torch.ones_like(pix[..., :1])), dim=-1) @ Hm.T
        pb = ph[..., :2] / ph[..., 2:]
        warp = to_normalized(pb, *size_B, pixel_center=0.0)
        inside = (warp.abs() < 1).all(dim=-1, keepdim=True) & (ph[..., 2:] > 0)
        return warp.float(), inside.float()

    @torch.inference_mode()
    def match(self, img_A, img_B):
        from romav2_plugin.io import to_tensor_image

        x_A = to_tensor_image(img_A, name="image A")
        x_B = to_tensor_image(img_B, name="image B")
        size_A, size_B = tuple(x_A.shape[-2:]), tuple(x_B.shape[-2:])
        h = self.H_hr if self.H_hr is not None else self.H_lr
        w = self.W_hr if self.W_hr is not None else self.W_lr
        Bn = x_A.shape[0]
        out = {}
        dirs = [("AB", self.H, size_A, size_B)]
        if self.bidirectional:
            dirs.append(("BA", torch.linalg.inv(self.H), size_B, size_A))
        for name, Hm, sa, sb in dirs:
            warp, overlap = self._warp(Hm, h, w, sa, sb)
            eye = torch.eye(2).expand(h, w, 2, 2)
            out[f"warp_{name}"] = warp[None].expand(Bn, -1, -1, -1).to(self.device)
            out[f"overlap_{name}"] = overlap[None].expand(Bn, -1, -1, -1).to(self.device)
            out[f"confidence_{name}"] = torch.logit(overlap.clamp(1e-4, 1 - 1e-4))[None].expand(Bn, -1, -1, -1).to(self.device)
            out[f"precision_{name}"] = eye[None].expand(Bn, -1, -1, -1, -1).to(self.device)
        for name in ("warp_BA", "overlap_BA", "confidence_BA", "precision_BA"):
            out.setdefault(name, None)
        return out
