import functools
import http.server
import json
import threading

import pytest
import torch
from conftest import MANIFEST

from romav2_plugin import RoMaV2
from romav2_plugin.weights import (
    OFFICIAL_URL,
    check_layout,
    load_checkpoint,
    official_layout,
    resolve_weights,
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
    # only the unused backbone blocks and pre-training/derived entries are not held by the model
    dropped = set(sd) - set(back)
    assert all(k.startswith(("f.blocks.18.", "f.blocks.19.", "f.blocks.2")) or k in ("f.mask_token", "f.rope_embed.periods") for k in dropped), dropped
    assert not any(k.startswith("f.vit.blocks.18") for k in model.state_dict())


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
    (served / "w.pt").write_bytes(b"payload")
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
    assert p == tmp_path / "cache" / "weights" / "w.pt" and p.read_bytes() == b"payload"
    assert resolve_weights(url) == p  # server is gone: served from the cache
