"""Ground truth for training: analytic homography and rigid-motion warps, occlusion handling."""

from __future__ import annotations

import math

import torch

from romav2_plugin.geometry import normalized_grid, to_normalized, to_pixel
from romav2_plugin.train.ground_truth import resample_ground_truth, warp_from_depth, warp_from_homography


def _centres(H, W):
    return to_pixel(normalized_grid(1, H, W, dtype=torch.float64), H, W, pixel_center=0.5)[0]


def test_homography_warp_is_analytic():
    H_A, W_A, H_B, W_B = 12, 20, 16, 18
    Hm = torch.tensor([[1.1, 0.05, 2.0], [-0.03, 0.95, -1.5], [1e-3, -2e-3, 1.0]], dtype=torch.float64)
    warp, covis = warp_from_homography(Hm[None], (H_A, W_A), (H_B, W_B))
    assert warp.shape == (1, H_A, W_A, 2) and covis.shape == (1, H_A, W_A)
    x = _centres(H_A, W_A)
    y = torch.cat((x, torch.ones_like(x[..., :1])), -1) @ Hm.T
    expected = to_normalized(y[..., :2] / y[..., 2:], H_B, W_B, pixel_center=0.5)
    assert torch.allclose(warp[0].double(), expected, atol=1e-5)
    inside = (expected.abs() < 1).all(-1)
    assert torch.equal(covis[0], inside)
    assert inside.any() and not inside.all()  # both cases exercised


def test_identity_homography_is_the_pixel_grid():
    warp, covis = warp_from_homography(torch.eye(3, dtype=torch.float64)[None], (8, 8), (8, 8))
    assert torch.allclose(warp, normalized_grid(1, 8, 8), atol=1e-6)
    assert covis.all()


def _plane_depth(K, n, d, H, W):
    """z-depth of the plane n.X = d seen by a camera at the origin."""
    x = _centres(H, W)
    rays = torch.cat((x, torch.ones_like(x[..., :1])), -1) @ torch.linalg.inv(K).T
    return d / (rays @ n)


def test_rigid_motion_over_a_plane_matches_its_homography():
    """Depth of a plane + a rigid motion give the plane-induced homography K_B (R + t n^T / d) K_A^-1."""
    H, W = 24, 32
    K = torch.tensor([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]], dtype=torch.float64)
    n = torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64)
    n = n / n.norm()
    d = 5.0
    a = math.radians(4)
    R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    t = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3], T[:3, 3] = R, t
    depth_A = _plane_depth(K, n, d, H, W)
    # B's depth of the same plane, in B's frame: n_B = R n, d_B = d + n_B . t
    n_B = R @ n
    depth_B = _plane_depth(K, n_B, d + float(n_B @ t), H, W)
    warp, covis = warp_from_depth(depth_A[None].float(), depth_B[None].float(), K[None], K[None], T[None])
    Hm = K @ (R + torch.outer(t, n) / d) @ torch.linalg.inv(K)
    expected, inside = warp_from_homography(Hm[None], (H, W), (H, W))
    assert torch.allclose(warp[covis], expected[covis], atol=1e-5)
    assert torch.equal(covis, inside)  # nothing occludes a single plane
    assert covis.float().mean() > 0.5


def test_occluded_pixels_are_not_covisible():
    """A wall at depth 10 seen by A; B sees a box in front of part of it: those pixels are occluded in B."""
    H, W = 16, 16
    K = torch.tensor([[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)  # same camera
    depth_A = torch.full((1, H, W), 10.0)
    depth_B = depth_A.clone()
    depth_B[:, 4:8, 4:8] = 3.0  # something nearer in B
    depth_B[:, 10:12, 10:12] = 0.0  # unknown depth in B
    warp, covis = warp_from_depth(depth_A, depth_B, K[None], K[None], T[None])
    expected = torch.ones(1, H, W, dtype=torch.bool)
    expected[:, 4:8, 4:8] = False
    expected[:, 10:12, 10:12] = False
    assert torch.equal(covis, expected)
    assert torch.allclose(warp, normalized_grid(1, H, W), atol=1e-6)
    # invalid depth in A is never co-visible
    depth_A[:, 0, 0] = 0
    _, covis = warp_from_depth(depth_A, depth_B, K[None], K[None], T[None])
    assert not covis[0, 0, 0]


def test_points_behind_the_camera_are_not_covisible():
    H, W = 8, 8
    K = torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[2, 3] = -20.0  # B sits 20 units in front of A's scene, looking the same way: scene behind B
    depth = torch.full((1, H, W), 10.0)
    _, covis = warp_from_depth(depth, depth, K[None], K[None], T[None])
    assert not covis.any()


def test_resample_interpolates_at_coarse_centres_and_respects_occlusions():
    """Identity at 8x8 -> identity at 4x4 exactly (no half-pixel bias); a coarse pixel touching a
    non-co-visible fine pixel is not co-visible."""
    warp = normalized_grid(1, 8, 8, dtype=torch.float64)
    covis = torch.ones(1, 8, 8, dtype=torch.bool)
    covis[0, 5, 2] = False
    w2, c2 = resample_ground_truth(warp, covis, (4, 4))
    assert torch.allclose(w2, normalized_grid(1, 4, 4, dtype=torch.float64), atol=1e-12)
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, 2, 1] = False  # the coarse pixel covering fine rows 4-5, columns 2-3
    assert torch.equal(c2, expected)
