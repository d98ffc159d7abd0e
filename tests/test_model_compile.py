"""``RoMaV2Config(compile=True)``: torch.compile of the fixed-shape parts gives the eager numbers (CPU)."""

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
    for k in ("warp_AB", "confidence_AB"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    assert want["warp_AB"].std() > 0.01  # not a degenerate output
    assert any(m.__dict__.get("_compiled_call_impl") is not None for m in compiled.refiners.values())
