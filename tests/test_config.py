import dataclasses
import subprocess
import sys

import pytest

from romav2_plugin.config import SETTINGS, RoMaV2Config, config_from_dict, get_setting


class _Dummy:
    pass


@pytest.mark.parametrize("name", [n for n in SETTINGS if n != "tiny"])  # tiny: romav2-tiny's own preset
def test_presets_equal_official(name):
    romav2 = pytest.importorskip("romav2.romav2")
    d = _Dummy()
    romav2.RoMaV2.apply_setting(d, name)
    s = get_setting(name)
    for attr in ("H_lr", "W_lr", "H_hr", "W_hr", "bidirectional", "threshold", "balanced_sampling"):
        assert getattr(s, attr) == getattr(d, attr), (name, attr)
    assert s.half_precision_kde  # the official KDE (and so its random draws)
    assert s.precise_fraction == 1.0  # every candidate can be drawn, as in the official sampler


def test_unknown_setting_and_keys_rejected():
    with pytest.raises(ValueError, match="Unknown setting 'ultra'.*precise"):
        get_setting("ultra")
    with pytest.raises(ValueError, match="Unknown setting"):
        RoMaV2Config(setting="ultra")
    with pytest.raises(ValueError, match="Unknown RoMaV2Config key.*colour"):
        config_from_dict(RoMaV2Config, {"colour": 1})
    with pytest.raises(ValueError, match="Unknown MatcherConfig key.*temp\\b"):
        config_from_dict(RoMaV2Config, {"matcher": {"temp": 0.2}})
    cfg = config_from_dict(RoMaV2Config, {"setting": "base", "matcher": {"temperature": 0.2}})
    assert cfg.setting == "base" and cfg.matcher.temperature == 0.2


def test_configs_frozen_and_presets_read_only():
    cfg = RoMaV2Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.setting = "turbo"  # type: ignore[misc]
    with pytest.raises(TypeError):
        SETTINGS["turbo"] = SETTINGS["base"]  # type: ignore[index]


def test_import_has_no_process_wide_side_effects():
    code = (
        "import torch\n"
        "before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,"
        " torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype())\n"
        "import romav2_plugin, romav2_plugin.model, romav2_plugin.weights.named\n"
        "after = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,"
        " torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype())\n"
        "assert before == after, (before, after)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
