"""End-point error of romav2-tiny on fresh *training-distribution* pairs (validation draws, seed 123, of the
training photographs; not the held-out set), for following training progress between parts.

    python -m benchmarks.tiny.train_epe WEIGHTS_OR_CHECKPOINT   # model.pt, or a run's checkpoint.pt (its EMA)

Prints, for 16 homography and 16 rendered pairs at 256 px: the median over pairs of each pair's median
end-point error (px) of the refined warp and of the matcher's warp on co-visible pixels, and the mean fraction
of co-visible pixels under 3 px.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config
    from romav2_plugin.train.data import HomographyPairs, ImageFolder, RenderedPairs

    src = (argv or sys.argv[1:])[0]
    torch.set_num_threads(1)
    if src.endswith("checkpoint.pt"):
        from romav2_plugin.train.checkpoint import load_training_state

        model = RoMaV2(tiny_config(), amp=False)
        state = load_training_state(src)
        model.load_state_dict(state["ema"]["state"])
        print("global step", state["global_step"])
    else:
        model = RoMaV2.from_pretrained(src, amp=False)
    model.eval()
    photos = ImageFolder(".tiny-data/train")
    geo = dict(max_rotation_deg=15.0, scale_range=(0.8, 1.25), max_translation=0.1, max_perspective=0.1)
    for name, ds in (("homography", HomographyPairs(photos, (256, 256), seed=123, photometric_strength=0.0, **geo)),
                     ("rendered", RenderedPairs(photos, (256, 256), seed=123, photometric_strength=0.0))):
        refined, coarse, under3 = [], [], []
        for i in range(16):
            s = ds.sample(i)
            with torch.inference_mode():
                p = model(s["image_A"][None], s["image_B"][None])
            c = s["covis_AB"]
            e = ((p["warp_AB"][0] - s["warp_AB"]) * 128).norm(dim=-1)[c]
            refined.append(e.median().item())
            under3.append((e < 3).float().mean().item())
            wm = F.interpolate(p["matcher"]["warp_AB"].permute(0, 3, 1, 2), size=(256, 256), mode="bilinear")
            coarse.append(((wm[0].permute(1, 2, 0) - s["warp_AB"]) * 128).norm(dim=-1)[c].median().item())
        print(f"{name}: median EPE refined {np.median(refined):.2f} px, matcher {np.median(coarse):.2f} px, "
              f"fraction < 3 px {np.mean(under3):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
