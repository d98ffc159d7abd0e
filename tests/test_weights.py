import functools
import http.server
import json
import re
import threading
import warnings

import pytest
import torch
from conftest import MANIFEST

from romav2_plugin import RoMaV2
from romav2_plugin.weights.download import resolve_weights
from romav2_plugin.weights.layout import (
    OFFICIAL_URL,
    CheckpointDtypeWarning,
    check_layout,
    check_values,
    load_checkpoint,
    official_layout,
)


@pytest.fixture(scope="module")
def layout():
    return official_layout()


def test_layout_equals_official_manifest(layout):
    if not MANIFEST.is_file():
        pytest.skip("../shared/reference/romav2_state_dict_manifest.json not present")
    manifest = json.loads(MANIFEST.read_text())
    assert len(manifest) == 907
    assert set(layout) == set(manifest)
    for k, v in manifest.items():
        shape, dtype = layout[k]
        assert list(shape) == v["shape"], k
        assert str(dtype).removeprefix("torch.") == v["dtype"], k


def test_random_checkpoint_loads_and_roundtrips(random_checkpoint, layout):
    sd = load_checkpoint(random_checkpoint)
    check_layout(sd, layout)
    model = RoMaV2.from_pretrained(sd, setting="turbo", amp=False)
    back = model.official_state_dict()
    for k, v in back.items():
        if k.endswith("qkv.bias"):  # the k third is masked out (zero here, random in the file)
            d = v.shape[0] // 3
            assert torch.equal(v[:d], sd[k][:d].to(v.dtype)) and torch.equal(v[2 * d :], sd[k][2 * d :].to(v.dtype))
            continue
        assert torch.equal(v, sd[k].to(v.dtype)), k
    # exactly the unused backbone blocks (18-23) and the pre-training/derived entries are not held by the model
    n_used = model.f.num_blocks
    unused = {k for k in sd if (m := re.match(r"f\.blocks\.(\d+)\.", k)) and int(m.group(1)) >= n_used}
    assert n_used == 18 and {int(k.split(".")[2]) for k in unused} == set(range(18, 24))
    assert set(sd) - set(back) == unused | {"f.mask_token", "f.rope_embed.periods"}
    assert not any(k.startswith("f.vit.blocks.18.") for k in model.state_dict())


@pytest.fixture(scope="module")
def small_sd(random_checkpoint):
    return load_checkpoint(random_checkpoint)


def test_missing_unexpected_misshaped_keys_listed(small_sd, layout):
    bad = dict(small_sd)
    del bad["matcher.temp"]
    bad["matcher.extra"] = torch.zeros(1)
    bad["refiners.4.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        check_layout(bad, layout)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "matcher.temp" in msg
    assert "unexpected keys (1)" in msg and "matcher.extra" in msg
    assert "mis-shaped keys (1)" in msg and "refiners.4.proj.weight: checkpoint (3, 3), expected (192, 256)" in msg
    with pytest.raises(ValueError, match="official RoMa v2 layout"):
        RoMaV2.from_pretrained(bad, setting="turbo")


def test_k_bias_is_masked_and_mask_checked(small_sd):
    model = RoMaV2.from_pretrained(small_sd, setting="turbo", amp=False)
    other = dict(small_sd)
    for k in [k for k in other if k.endswith("attn.qkv.bias")]:
        v = other[k].clone()
        d = v.shape[0] // 3
        v[d : 2 * d] = 5.0  # different masked k-bias
        other[k] = v
    model2 = RoMaV2.from_pretrained(other, setting="turbo", amp=False)
    x = torch.rand(1, 3, 64, 96)
    a, b = model.f(x), model2.f(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    bad = dict(small_sd)
    k = "f.blocks.3.attn.qkv.bias_mask"
    bad[k] = torch.ones_like(bad[k])
    with pytest.raises(ValueError, match="k-bias mask"):
        RoMaV2.from_pretrained(bad, setting="turbo")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a loadable PyTorch checkpoint"):
        load_checkpoint(p)
    torch.save({"model": {"a": torch.zeros(1)}}, p)
    with pytest.raises(ValueError, match="flat state dict"):
        load_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_weights_only_refuses_pickled_code(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"a": _Evil()}, p)
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(p)


def test_resolve_path_env_and_missing(tmp_path, monkeypatch):
    p = tmp_path / "w.pt"
    p.write_bytes(b"x")
    assert resolve_weights(p) == p
    monkeypatch.setenv("ROMAV2_WEIGHTS", str(p))
    assert resolve_weights(None) == p
    with pytest.raises(FileNotFoundError, match="not found at"):
        resolve_weights(tmp_path / "nope.pt")


def test_offline_download_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ROMAV2_WEIGHTS", "http://127.0.0.1:9/romav2.0.1.pt")  # nothing listens on port 9
    with pytest.raises(RuntimeError) as e:
        RoMaV2.from_pretrained(None, setting="turbo")
    msg = str(e.value)
    assert "offline" in msg and "ROMAV2_WEIGHTS" in msg and OFFICIAL_URL in msg and "weights=" in msg
    assert not list((tmp_path / "cache").rglob("*.part"))  # no half-written file left behind


def test_url_download_is_cached(tmp_path, monkeypatch):
    served = tmp_path / "srv"
    served.mkdir()
    torch.save({"a": torch.arange(3.0)}, served / "w.pt")
    payload = (served / "w.pt").read_bytes()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pt"
    try:
        p = resolve_weights(url)
    finally:
        httpd.shutdown()
    assert p == tmp_path / "cache" / "weights" / "w.pt" and p.read_bytes() == payload
    assert resolve_weights(url) == p  # server is gone: served from the cache


# --------------------------------------------------------------------------------------------------------
# unreadable files: the reason, the file, never torch's advice to load unsafely


def test_empty_checkpoint_file_is_named(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt is not a loadable PyTorch checkpoint: the file is empty \(0 bytes\)"):
        load_checkpoint(p)


@pytest.mark.parametrize("kind", ["evil", "html", "pickle", "cut"])
def test_unreadable_file_messages_never_advise_unsafe_loading(tmp_path, kind):
    p = tmp_path / "w.pt"
    if kind == "evil":
        torch.save({"a": _Evil()}, p)
        expect = "could run code"
    elif kind == "html":
        p.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
        expect = "HTML"
    elif kind == "pickle":
        import pickle

        p.write_bytes(pickle.dumps({"a": 1}, protocol=2))
        expect = "Invalid magic number"
    else:
        torch.save({"a": torch.zeros(1000)}, p)
        p.write_bytes(p.read_bytes()[:700])
        expect = "cut off"
    with pytest.raises(ValueError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert str(p) in msg and expect in msg, msg
    for unsafe in ("weights_only", "trust", "safe_globals", "arbitrary code", "\x1b["):
        assert unsafe not in msg, msg


def test_bad_cached_download_says_which_file_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "weights" / "romav2.0.1.pt"
    cached.parent.mkdir(parents=True)
    cached.write_text("<html>404</html>")
    with pytest.raises(ValueError, match=f"delete {re.escape(str(cached))} and run again"):
        load_checkpoint(cached)
    other = tmp_path / "mine.pt"
    other.write_text("<html>404</html>")
    with pytest.raises(ValueError) as e:
        load_checkpoint(other)
    assert "delete" not in str(e.value) and OFFICIAL_URL in str(e.value)


def test_missing_file_mentions_the_env_var_only_when_it_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("ROMAV2_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        resolve_weights(tmp_path / "nope.pt")
    assert "ROMAV2_WEIGHTS" not in str(e.value)
    monkeypatch.setenv("ROMAV2_WEIGHTS", str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match=r"ROMAV2_WEIGHTS=.*gone\.pt"):
        resolve_weights(None)
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        resolve_weights(tmp_path)


# --------------------------------------------------------------------------------------------------------
# values: non-finite weights and dtypes


def test_nonfinite_weights_are_refused_naming_the_tensors(small_sd, layout):
    bad = dict(small_sd)
    bad["matcher.temp"] = torch.full_like(bad["matcher.temp"], float("nan"))
    w = bad["refiners.4.proj.weight"].clone()
    w[0, :3] = float("inf")
    bad["refiners.4.proj.weight"] = w
    with pytest.raises(ValueError) as e:
        check_layout(bad, layout)
    msg = str(e.value)
    assert "non-finite weights in 2 tensor(s)" in msg
    assert "matcher.temp (1 NaN, 0 inf of 1)" in msg and "refiners.4.proj.weight (0 NaN, 3 inf of 49152)" in msg
    with pytest.raises(ValueError, match="non-finite"):
        RoMaV2.from_pretrained(bad, setting="turbo")  # the loading path refuses it, not only check_layout


def test_nonfinite_check_sees_a_nan_in_an_overflowing_tensor(layout):
    # the fast path (a finite sum) cannot be fooled: a sum that overflows falls back to the exact count
    big = torch.full((4,), 3e38)
    check_values({"matcher.temp": torch.tensor([1.0]), "x": big}, layout)  # finite although the sum is inf
    big[1] = float("nan")
    with pytest.raises(ValueError, match=r"x \(1 NaN, 0 inf of 4\)"):
        check_values({"x": big}, layout)


def test_fp16_checkpoint_is_refused_and_an_explicit_upcast_is_accepted_and_said(small_sd, layout):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in small_sd.items()}
    n_float = sum(1 for v in small_sd.values() if v.is_floating_point())
    with pytest.raises(ValueError) as e:
        check_layout(half, layout)
    msg = str(e.value)
    assert f"{n_float} checkpoint tensor(s) are stored in a lower or incompatible precision" in msg
    assert f"and {n_float - 8} more" in msg and "v.float()" in msg
    two = dict(small_sd)
    for k in ("f.blocks.0.attn.proj.bias", "matcher.temp"):
        two[k] = two[k].half()
    with pytest.raises(ValueError) as e:
        check_layout(two, layout)
    msg = str(e.value)
    assert "f.blocks.0.attn.proj.bias float16 (expected bfloat16)" in msg
    assert "matcher.temp float16 (expected float32)" in msg
    # bf16 is the release's dtype for the backbone only
    bf = dict(small_sd)
    bf["matcher.temp"] = bf["matcher.temp"].bfloat16()
    with pytest.raises(ValueError, match=r"matcher\.temp bfloat16 \(expected float32\)"):
        check_layout(bf, layout)
    # the opt-in the message proposes: everything in fp32 (holds every bf16 value); said once, by key
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in small_sd.items()}
    with pytest.warns(CheckpointDtypeWarning) as rec:
        check_layout(up, layout)
    assert len(rec) == 1
    n_bf16 = sum(1 for k, (_, dt) in layout.items() if dt == torch.bfloat16)
    assert f"{n_bf16} checkpoint tensor(s)" in str(rec[0].message)
    first_bf16 = next(k for k in up if layout[k][1] == torch.bfloat16)
    assert f"{first_bf16} float32 (expected bfloat16)" in str(rec[0].message)
    # float64 holds fp32 values too
    f64 = dict(small_sd)
    f64["matcher.temp"] = f64["matcher.temp"].double()
    with pytest.warns(CheckpointDtypeWarning, match=r"matcher\.temp float64 \(expected float32\)"):
        check_layout(f64, layout)


def test_release_dtypes_load_without_a_warning(small_sd, layout):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_layout(small_sd, layout)
