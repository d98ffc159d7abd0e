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

__all__ = [
    "make_random_official_state_dict",
    "make_random_official_checkpoint",
    "micro_config",
    "make_micro_weights",
    "WarpDouble",
    "HomographyWarpDouble",
    "ScrambledWarpDouble",
]


def make_random_official_state_dict(seed: int = 0, *, k_bias_scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random weights with exactly the official layout.

    The masked key biases are filled with non-zero values (the mask must make them irrelevant), the
    BatchNorm running statistics are randomised so that eval-mode normalisation is exercised.
    """
    from romav2_plugin.config import BackboneConfig
    from romav2_plugin.model import RoMaV2
    from romav2_plugin.nn.backbone import _create_timm_vit
    from romav2_plugin.weights.layout import internal_to_official, official_layout

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


def micro_config():
    """A very small configuration of the same architecture (2-block, 32-wide backbone; 8-channel refiners)
    at the ``tiny`` setting: real model code that runs in well under a second per pair on a CPU, for tests
    and benchmarks of the plumbing around the model (pair lists, Ray workers, files)."""
    from romav2_plugin.config import (
        BackboneConfig,
        FineFeaturesConfig,
        MatcherConfig,
        RefinerConfig,
        RoMaV2Config,
    )

    refiners = tuple(
        RefinerConfig(stride=s, feat_dim=8, proj_dim=4, displacement_emb_dim=7, local_corr_radius=r, hidden_blocks=1)
        for s, r in ((4, 1), (2, 1), (1, None))
    )
    matcher = MatcherConfig(
        feat_dim=32, vit_dim=32, vit_depth=1, vit_heads=2, out_dim=32, dpt_features=8, dpt_out_channels=(8, 8, 16, 16)
    )
    return RoMaV2Config(
        backbone=BackboneConfig(layers=(0, 1), embed_dim=32, depth=2, num_heads=2),
        matcher=matcher,
        refiners=refiners,
        fine_features=FineFeaturesConfig(channels=(8, 8, 8)),
        setting="tiny",
    )


def make_micro_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Seeded random weights of :func:`micro_config` written to ``path`` with their model card (so that
    ``RoMaV2.from_pretrained(path)`` and ``--weights PATH`` build the micro architecture). Returns the path."""
    from romav2_plugin.model import RoMaV2
    from romav2_plugin.train.checkpoint import export_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RoMaV2(micro_config(), amp=False)
    return export_weights(Path(path), model)


class WarpDouble(torch.nn.Module):
    """Test double for the *network only*: ``match()`` returns an exact dense warp that a subclass defines.

    Everything downstream of the network (sampling, pixel conversion, adapters) is the real code of
    :class:`~romav2_plugin.RoMaV2`, so coordinate-convention bugs in it show up as errors against the known
    geometry. Subclasses implement :meth:`pixel_warp`.

    Args:
        setting: which preset's working resolution (and bidirectionality) to mimic.
    """

    def __init__(self, setting: str = "turbo") -> None:
        super().__init__()
        from romav2_plugin.model import RoMaV2

        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.amp = False
        RoMaV2.apply_setting(self, setting)  # sets H_lr, W_lr, H_hr, W_hr, bidirectional, ...

    # real post-processing of the model
    from romav2_plugin.model import RoMaV2 as _M

    apply_setting = _M.apply_setting
    sample = _M.sample
    grid_matches = _M.grid_matches
    to_pixel_coordinates = staticmethod(_M.to_pixel_coordinates)
    match_keypoints = staticmethod(_M.match_keypoints)
    del _M

    @property
    def device(self) -> torch.device:
        return self._dummy.device

    def pixel_warp(
        self, pix: torch.Tensor, x_from: torch.Tensor, x_to: torch.Tensor, reverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where pixels of one image land in the other.

        Args:
            pix: ``(h, w, 2)`` float64 pixel coordinates ``(x, y)`` in ``x_from`` (OpenCV convention: top-left
                pixel centre at ``(0, 0)``).
            x_from, x_to: ``(C, H, W)`` the two images as given to :meth:`match` (B for ``reverse``).
            reverse: ``False`` for A -> B, ``True`` for B -> A.

        Returns:
            ``(h, w, 2)`` float64 pixel coordinates in ``x_to`` (same convention) and ``(h, w)`` bool validity
            (a point also counts as invalid when it lands outside ``x_to``).
        """
        raise NotImplementedError

    def _warp(self, x_from: torch.Tensor, x_to: torch.Tensor, h: int, w: int, reverse: bool):
        from romav2_plugin.geometry import normalized_grid, to_normalized, to_pixel

        H_from, W_from = x_from.shape[-2:]
        H_to, W_to = x_to.shape[-2:]
        grid = normalized_grid(1, h, w, dtype=torch.float64)[0]
        pix_to, valid = self.pixel_warp(to_pixel(grid, H_from, W_from, pixel_center=0.0), x_from, x_to, reverse)
        warp = to_normalized(pix_to.double(), H_to, W_to, pixel_center=0.0)
        inside = (warp.abs() < 1).all(dim=-1) & valid.bool()
        return warp.float(), inside[..., None].float()

    @torch.inference_mode()
    def match(self, img_A, img_B):
        from romav2_plugin.io import to_tensor_image

        x_A = to_tensor_image(img_A, name="image A").cpu()
        x_B = to_tensor_image(img_B, name="image B").cpu()
        h = self.H_hr if self.H_hr is not None else self.H_lr
        w = self.W_hr if self.W_hr is not None else self.W_lr
        out = {}
        dirs = [("AB", x_A, x_B, False)] + ([("BA", x_B, x_A, True)] if self.bidirectional else [])
        for name, xs_from, xs_to, reverse in dirs:
            warps, overlaps = zip(*(self._warp(a, b, h, w, reverse) for a, b in zip(xs_from, xs_to)))
            warp, overlap = torch.stack(warps), torch.stack(overlaps)
            eye = torch.eye(2).expand(len(warp), h, w, 2, 2)
            out[f"warp_{name}"] = warp.to(self.device)
            out[f"overlap_{name}"] = overlap.to(self.device)
            out[f"confidence_{name}"] = torch.logit(overlap.clamp(1e-4, 1 - 1e-4)).to(self.device)
            out[f"precision_{name}"] = eye.to(self.device)
        for name in ("warp_BA", "overlap_BA", "confidence_BA", "precision_BA"):
            out.setdefault(name, None)
        return out


class HomographyWarpDouble(WarpDouble):
    """:class:`WarpDouble` whose warp is a known homography.

    Args:
        H: ``(3, 3)`` homography mapping pixel coordinates of A to pixel coordinates of B, both in the
            OpenCV convention (top-left pixel centre at ``(0, 0)``).
        setting: which preset's working resolution (and bidirectionality) to mimic.
    """

    def __init__(self, H, setting: str = "turbo") -> None:
        super().__init__(setting)
        self.H = torch.as_tensor(H, dtype=torch.float64)

    def pixel_warp(self, pix, x_from, x_to, reverse):
        Hm = torch.linalg.inv(self.H) if reverse else self.H
        ph = torch.cat((pix, torch.ones_like(pix[..., :1])), dim=-1) @ Hm.T
        return ph[..., :2] / ph[..., 2:], ph[..., 2] > 0


class ScrambledWarpDouble(WarpDouble):
    """:class:`WarpDouble` whose warp sends every pixel to an unrelated pixel of the other image (seeded,
    uniform), with full overlap: confident matches that fit no two-view geometry, what a matcher can return
    for two unrelated images.

    Args:
        seed: seed of the scrambled warp (the same for every call).
        setting: which preset's working resolution (and bidirectionality) to mimic.
    """

    def __init__(self, seed: int = 0, setting: str = "turbo") -> None:
        super().__init__(setting)
        self.seed = seed

    def pixel_warp(self, pix, x_from, x_to, reverse):
        g = torch.Generator().manual_seed(self.seed + int(reverse))
        H_to, W_to = x_to.shape[-2:]
        u = torch.rand(*pix.shape[:-1], 2, generator=g, dtype=torch.float64)
        out = u * torch.tensor([W_to - 1, H_to - 1], dtype=torch.float64)
        return out, torch.ones(pix.shape[:-1], dtype=torch.bool)
