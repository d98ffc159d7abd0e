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
    torch.manual_seed(0)
    cfg = tiny_config()
    eager = RoMaV2(cfg, amp=False)
    compiled = RoMaV2(dataclasses.replace(cfg, compile=True), amp=False)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: same checkpoint keys
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    A, B = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.inference_mode():
        want, got = eager(A, B), compiled(A, B)
    for k in ("warp_AB", "confidence_AB"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    assert want["warp_AB"].std() > 0.01  # not a degenerate output
    assert any(m.__dict__.get("_compiled_call_impl") is not None for m in compiled.refiners.values())
