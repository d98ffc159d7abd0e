"""bf16 autocast on the CPU: which precision ``amp=None`` picks, and how far bf16 moves the outputs.

The default (:func:`romav2_plugin.runtime.amp_default`) is bf16 autocast on CUDA and on CPUs with native bf16
(AVX512-BF16 or AMX, as PyTorch reports them), fp32 elsewhere, overridable with ``$ROMAV2_CPU_BF16``. The
selection logic is tested on every machine with the detection monkeypatched; the bf16-vs-fp32 parity tests
need a CPU with native bf16 (elsewhere bf16 is emulated and very slow) and are skipped without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from romav2_plugin import RoMaV2, runtime
from romav2_plugin.testing import make_micro_weights, micro_config

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"

needs_native_bf16 = pytest.mark.skipif(
    not runtime.native_cpu_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 would be emulated, very slowly",
)


def _backbone_dtype(model: RoMaV2) -> torch.dtype:
    return model.f.vit.patch_embed.proj.weight.dtype


def _fake_cpu(monkeypatch, avx512_bf16, amx):
    """Make torch's CPU capability checks answer as given (``None``: the check does not exist)."""
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, value)


# ------------------------------------------------------------------ the default, on every machine
@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [
        (lambda: True, lambda: False, True),  # AVX512-BF16 (e.g. AMD Zen 4, Intel Cooper Lake)
        (lambda: False, lambda: True, True),  # AMX (Intel Sapphire Rapids and later)
        (lambda: False, lambda: False, False),  # neither: bf16 emulated
        (None, None, False),  # a torch without these private checks
        (lambda: 1 / 0, lambda: False, False),  # a failing probe never breaks model construction
    ],
)
def test_native_cpu_bf16_reads_torchs_capability_checks(monkeypatch, avx512_bf16, amx, native):
    _fake_cpu(monkeypatch, avx512_bf16, amx)
    assert runtime.native_cpu_bf16() is native


@pytest.mark.parametrize("native", [True, False])
def test_amp_default_per_device_and_override(monkeypatch, native):
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: native)
    monkeypatch.delenv("ROMAV2_CPU_BF16", raising=False)
    assert runtime.amp_default("cpu") is native
    assert runtime.amp_default(torch.device("cuda", 1)) is True  # CUDA: always (no device needed to ask)
    assert runtime.amp_default("mps") is False and runtime.amp_default("meta") is False
    for value, want in (("auto", native), ("", native), (" AUTO ", native), ("1", True), ("on", True),
                        ("true", True), ("0", False), ("OFF", False), ("false", False)):  # fmt: skip
        monkeypatch.setenv("ROMAV2_CPU_BF16", value)
        assert runtime.amp_default("cpu") is want, value
        assert runtime.amp_default("cuda") is True, value  # the variable is about the CPU only
    monkeypatch.setenv("ROMAV2_CPU_BF16", "bf16")
    with pytest.raises(ValueError, match=r"ROMAV2_CPU_BF16='bf16'.*auto.*1.*0"):
        runtime.amp_default("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_model_default_follows_the_detection_and_explicit_amp_wins(monkeypatch, native):
    """``amp=None`` runs exactly as ``amp=True`` on a CPU with native bf16 and as ``amp=False`` without one
    (same weights, bitwise the same outputs); the frozen backbone is held accordingly; ``amp=False/True``
    ignore the detection."""
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: native)
    monkeypatch.delenv("ROMAV2_CPU_BF16", raising=False)
    torch.manual_seed(0)
    default = RoMaV2(micro_config(), setting="turbo")
    default.H_lr = default.W_lr = 32
    assert default.amp is None
    assert _backbone_dtype(default) == (torch.bfloat16 if native else torch.float32)
    sd = default.state_dict()
    explicit = {}
    for amp in (False, True):
        m = RoMaV2(micro_config(), setting="turbo", amp=amp)
        m.load_state_dict(sd)
        m.H_lr = m.W_lr = 32
        assert _backbone_dtype(m) == (torch.bfloat16 if amp else torch.float32)  # detection ignored
        explicit[amp] = m
    g = torch.Generator().manual_seed(1)
    A, B = torch.rand(3, 40, 48, generator=g), torch.rand(3, 36, 30, generator=g)
    got = default.match(A, B)
    same, other = explicit[native].match(A, B), explicit[not native].match(A, B)
    for k in ("warp_AB", "overlap_AB", "precision_AB"):
        torch.testing.assert_close(got[k], same[k], rtol=0, atol=0)
    assert not torch.equal(got["warp_AB"], other["warp_AB"])  # bf16 and fp32 do differ: the check has teeth
    # the override switches a model built under the other answer: set_amp(None) re-holds the backbone
    monkeypatch.setenv("ROMAV2_CPU_BF16", "0" if native else "1")
    default.set_amp(None)
    assert _backbone_dtype(default) == (torch.float32 if native else torch.bfloat16)
    torch.testing.assert_close(default.match(A, B)["warp_AB"], other["warp_AB"], rtol=0, atol=0)


def test_from_pretrained_and_commands_pass_none_for_the_default(monkeypatch, tmp_path):
    """``from_pretrained``, the CLI (``--fp32`` or not) and the adapters' defaults leave ``amp=None`` to the
    detection; ``--fp32`` and ``amp=False`` pin fp32."""
    from romav2_plugin.adapters import hloc as hloc_adapter
    from romav2_plugin.app import cli

    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    monkeypatch.delenv("ROMAV2_CPU_BF16", raising=False)
    path = make_micro_weights(tmp_path / "micro.pt")
    assert _backbone_dtype(RoMaV2.from_pretrained(path, device="cpu")) == torch.bfloat16
    assert _backbone_dtype(RoMaV2.from_pretrained(path, device="cpu", amp=False)) == torch.float32
    args = cli.build_parser().parse_args(["a.jpg", "b.jpg"])
    assert args.fp32 is False
    assert cli.build_parser().parse_args(["a.jpg", "b.jpg", "--fp32"]).fp32 is True
    assert hloc_adapter.DEFAULT_MODEL_CONF["amp"] is None
    import inspect

    from romav2_plugin.adapters.kornia import RoMaV2 as KorniaRoMaV2

    assert inspect.signature(KorniaRoMaV2).parameters["amp"].default is None


def test_fine_features_autocast_on_the_cpu():
    """Under amp the VGG features run in bf16 on the input's device (the official CUDA placement), fp32 without."""
    torch.manual_seed(0)
    m = RoMaV2(micro_config(), amp=False)
    x = torch.rand(1, 3, 16, 16)
    assert {f.dtype for f in m.refiner_features(x, amp=True).values()} == {torch.bfloat16}
    assert {f.dtype for f in m.refiner_features(x, amp=False).values()} == {torch.float32}


# ------------------------------------------------------------------ bf16 vs fp32, on CPUs with native bf16
def _demo_pair():
    from PIL import Image

    return Image.open(ASSETS / "demo_A.jpg").convert("RGB"), Image.open(ASSETS / "demo_B.jpg").convert("RGB")


def _diffs(p32: dict, p16: dict, key: str = "AB") -> dict[str, torch.Tensor]:
    """Per-pixel differences: warp (max over x/y, normalized units), overlap (absolute) and precision
    (Frobenius norm of the 2x2 difference relative to the fp32 matrix's)."""
    P32, P16 = p32["precision_" + key].flatten(0, -3), p16["precision_" + key].flatten(0, -3)
    return {
        "warp": (p16["warp_" + key] - p32["warp_" + key]).abs().amax(-1).flatten(),
        "overlap": (p16["overlap_" + key] - p32["overlap_" + key]).abs().flatten(),
        "precision": (P16 - P32).flatten(1).norm(dim=1) / P32.flatten(1).norm(dim=1),
    }


def _check(diffs: dict[str, torch.Tensor], bounds: dict[str, dict[float, float]]) -> None:
    for name, per_quantile in bounds.items():
        d = diffs[name].double()
        for q, bound in per_quantile.items():
            got = d.max().item() if q == 1.0 else d.quantile(q).item()
            assert got <= bound, f"{name}: quantile {q} of |bf16 - fp32| is {got:.3g} > {bound:.3g}"
    assert diffs["warp"].max() > 0  # bf16 did run (an all-zero difference would mean fp32 twice)


#: Seeded random official-layout weights (``make_random_official_state_dict(0)``, the conftest's
#: ``random_checkpoint``), ``precise`` with lr 128 and hr 192, bidirectional, the demo pair. Measured on an AMD
#: EPYC with AVX512-BF16 (torch 2.14.1, 2026-12-06), both directions: warp median 4.6e-5 / max 1.2e-4
#: (normalized), overlap median 2.7e-5 / max 2.0e-4, precision relative median 1.4e-4 / 99% 3.4e-4 / max
#: 4.7e-4. Random weights give near-constant outputs (overlap ~0.49-0.50), so the differences are small;
#: the bounds are about 4x the measured figures.
RANDOM_BOUNDS = {
    "warp": {0.5: 2e-4, 1.0: 5e-4},
    "overlap": {0.5: 1e-4, 1.0: 1e-3},
    "precision": {0.5: 6e-4, 0.99: 1.5e-3, 1.0: 2e-3},
}

#: romav2-tiny (shipped weights, ``tiny`` setting: 256x256 + a 384x384 pass), the demo pair, A->B. Measured as
#: above: warp median 1.9e-4 (0.04 px at 384) / 99% 7.5e-3 / max 1.6e-2 (normalized), overlap median 5.0e-5 /
#: 99% 2.5e-3 / max 2.1e-2, precision relative median 1.1e-2 / 99% 0.21 / max 1.03 (a few near-singular
#: matrices; no bound on the max). Bounds about 3-5x the measured figures.
TINY_BOUNDS = {
    "warp": {0.5: 1e-3, 0.99: 3e-2, 1.0: 6e-2},
    "overlap": {0.5: 2.5e-4, 0.99: 1e-2, 1.0: 8e-2},
    "precision": {0.5: 5e-2, 0.99: 0.6},
}
#: The demo pair's median reprojection error of 5000 sampled matches (seed 0): 1.192 px in fp32 and 1.192 px
#: under bf16 (measured as above). Bound on the change, in pixels.
TINY_DEMO_PX_TOL = 0.1


@pytest.mark.slow
@needs_native_bf16
def test_bf16_matches_fp32_with_random_official_weights(random_checkpoint):
    A, B = _demo_pair()
    preds = {}
    for amp in (False, True):
        m = RoMaV2.from_pretrained(random_checkpoint, setting="precise", amp=amp)
        m.H_lr = m.W_lr = 128
        m.H_hr = m.W_hr = 192
        assert _backbone_dtype(m) == (torch.bfloat16 if amp else torch.float32)
        preds[amp] = m.match(A, B)
    for key in ("AB", "BA"):
        _check(_diffs(preds[False], preds[True], key), RANDOM_BOUNDS)


@needs_native_bf16
def test_bf16_matches_fp32_with_romav2_tiny_on_the_demo_pair():
    from benchmarks.tiny.heldout import demo_median_error

    A, B = _demo_pair()
    models = {amp: RoMaV2.from_pretrained("tiny", amp=amp) for amp in (False, True)}
    _check(_diffs(models[False].match(A, B), models[True].match(A, B)), TINY_BOUNDS)
    px = {amp: demo_median_error(m) for amp, m in models.items()}
    assert abs(px[True] - px[False]) <= TINY_DEMO_PX_TOL, px
