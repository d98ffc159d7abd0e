import numpy as np
import torch

from romav2_plugin.geometry import normalized_grid, precision_matrix, to_normalized, to_pixel


def test_grid_is_pixel_centres():
    g = normalized_grid(2, 3, 4)
    assert g.shape == (2, 3, 4, 2)
    # centre of pixel column 0 of a width-4 image: -1 + 1/4; of row 2 of a height-3 image: 1 - 1/3
    assert torch.allclose(g[0, 2, 0], torch.tensor([-0.75, 1 - 1 / 3]))


def test_pixel_conventions():
    H, W = 3, 4
    g = normalized_grid(1, H, W, dtype=torch.float64)[0]
    centre0 = to_pixel(g, H, W, pixel_center=0.0)
    centre05 = to_pixel(g, H, W, pixel_center=0.5)
    jj, ii = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    assert torch.allclose(centre0, torch.stack((ii, jj), -1))  # OpenCV: pixel (i, j) centre at (i, j)
    assert torch.allclose(centre05, torch.stack((ii, jj), -1) + 0.5)  # official: at (i + .5, j + .5)
    # the corners of the image
    assert torch.allclose(to_pixel(torch.tensor([[-1.0, -1.0]]), H, W, pixel_center=0.5), torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(to_pixel(torch.tensor([[1.0, 1.0]]), H, W, pixel_center=0.0), torch.tensor([[W - 0.5, H - 0.5]]))
    for c in (0.0, 0.5):
        x = torch.rand(10, 2, dtype=torch.float64) * 2 - 1
        assert torch.allclose(to_normalized(to_pixel(x, H, W, pixel_center=c), H, W, pixel_center=c), x)


def test_precision_matrix():
    p = torch.tensor([[2.0, 0.5, 3.0]])
    assert torch.equal(precision_matrix(p), torch.tensor([[[2.0, 0.5], [0.5, 3.0]]]))


def test_similarity_fit_recovers_a_known_similarity_float64():
    from romav2_plugin.geometry import similarity_fit

    rng = np.random.default_rng(0)
    src = rng.normal(size=(12, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R_true = q * np.sign(np.linalg.det(q))  # a rotation, not a reflection
    s_true, t_true = 2.5, np.array([0.3, -1.0, 4.0])
    s, R, t = similarity_fit(src, s_true * src @ R_true.T + t_true)
    assert abs(s - s_true) < 1e-12 and np.abs(R - R_true).max() < 1e-12 and np.abs(t - t_true).max() < 1e-12
    assert abs(np.linalg.det(R) - 1.0) < 1e-12
