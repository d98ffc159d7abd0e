"""``RoMaV2Config(compile=True)``: torch.compile of the fixed-shape parts stays close to eager (CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from romav2_plugin import RoMaV2
from romav2_plugin.config import RoMaV2Config, tiny_config


def test_compile_option_defaults_off_and_rejects_non_bools():
    assert RoMaV2Config().compile is False and tiny_config().compile is False
    with pytest.raises(ValueError, match="compile must be True or False"):
        dataclasses.replace(tiny_config(), compile="yes")


@pytest.mark.slow  # inductor compiles every part on the CPU: 4-7 minutes on 2 contended cores
def test_compiled_model_matches_eager_on_cpu():
    eager = RoMaV2.from_pretrained("tiny", amp=False)  # the shipped weights: a real warp, not a random one
    compiled = RoMaV2.from_pretrained("tiny", amp=False, config=dataclasses.replace(tiny_config(), compile=True))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: same checkpoint keys
    import skimage.data

    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 255
    A = torch.nn.functional.interpolate(img, size=(64, 64), mode="bilinear", antialias=True)
    B = torch.nn.functional.interpolate(img[..., 40:, 30:], size=(64, 64), mode="bilinear", antialias=True)
    with torch.inference_mode():
        want, got = eager(A, B), compiled(A, B)
    # Not bit-close: on 2026-12-06 (torch 2.14.1, CPU inductor, fp32) the compiled model differed from eager by
    # up to 2.7e-3 in the final warp (normalized; mean 4e-4) and 1.5e-3 already in the matcher's warp, 3.2e-2
    # in the confidence logits (mean 1.3e-3). The bounds below hold that; where inductor changes the numbers
    # that much in fp32 is not known yet (an open item: compile stays opt-in and unmeasured on the GPU).
    dw = (got["warp_AB"] - want["warp_AB"]).abs()
    dc = (got["confidence_AB"] - want["confidence_AB"]).abs()
    assert dw.max() < 5e-3 and dw.mean() < 1e-3, (float(dw.max()), float(dw.mean()))
    assert dc.max() < 5e-2 and dc.mean() < 5e-3, (float(dc.max()), float(dc.mean()))
    assert want["warp_AB"].std() > 0.01  # not a degenerate output
    assert any(m.__dict__.get("_compiled_call_impl") is not None for m in compiled.refiners.values())
