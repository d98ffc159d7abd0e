"""romav2-export's checks: the opset is range-checked before anything loads (18 to the
newest the installed torch.onnx exporter and onnx package write), and the written graph must pass
onnx.checker and load in an ONNX Runtime session before "wrote ..." is printed; otherwise nothing is left
(the staged files are removed, an existing --out is kept) and the command exits non-zero. ``--opset 29`` was
a traceback, then "wrote ...", exit 0, and a file ONNX Runtime refuses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from romav2_plugin import export as ex
from romav2_plugin.testing import make_micro_weights

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_weights(tmp_path_factory.mktemp("w") / "micro.pt")


def test_supported_opsets_follow_the_installed_exporter():
    from torch.onnx import _constants

    lo, hi = ex.supported_opsets()
    assert lo == 18 and hi == min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


@pytest.mark.parametrize("opset", ["29", "17", "1000"])
def test_cli_opset_out_of_range_exits_2_before_loading(micro, tmp_path, capsys, monkeypatch, opset):
    from romav2_plugin import model

    def no_load(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(model.RoMaV2, "from_pretrained", no_load)
    out = tmp_path / "m.onnx"
    code = ex.main(["--out", str(out), "--weights", str(micro), "--opset", opset])
    err = capsys.readouterr().err
    lo, hi = ex.supported_opsets()
    assert code == 2, err
    assert f"opset must be in [{lo}, {hi}]" in err and opset in err, err
    assert list(tmp_path.iterdir()) == []


def _custom_op_model(path: Path) -> None:
    """A graph onnx.checker accepts (unknown domains are not checked) and ONNX Runtime refuses to load."""
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="org.example.nowhere")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("org.example.nowhere", 1)])
    onnx.save(m, str(path))
    path.with_name(path.name + ".data").write_bytes(b"")


def test_check_graph_refuses_what_onnxruntime_cannot_load(tmp_path):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    _custom_op_model(bad)
    onnx.checker.check_model(str(bad))  # the checker alone would pass it
    with pytest.raises(RuntimeError, match="ONNX Runtime cannot load the exported graph"):
        ex.check_graph(bad)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(RuntimeError, match="onnx.checker"):
        ex.check_graph(tmp_path / "junk.onnx")


def test_refused_graph_is_not_reported_and_leaves_nothing(micro, tmp_path, capsys, monkeypatch):
    """The exporter is replaced by one writing a graph ONNX Runtime refuses: exit 1, no 'wrote', the
    existing --out (replaced with --overwrite) is byte-identical and no staging folder is left."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, **k: _custom_op_model(Path(f)))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    (tmp_path / "m.onnx.data").write_bytes(b"its data")
    code = ex.main(["--out", str(out), "--weights", str(micro), "--overwrite"])
    cap = capsys.readouterr()
    assert code == 1, cap.err
    assert "ONNX Runtime cannot load the exported graph" in cap.err and "wrote" not in cap.out, (cap.out, cap.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(b"an earlier export").digest()


@pytest.mark.slow
def test_highest_supported_opset_exports_and_loads(micro, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from romav2_plugin import RoMaV2

    m = RoMaV2.from_pretrained(micro, setting="turbo", amp=False)
    m.H_lr = m.W_lr = 64
    path = ex.export_onnx(m, tmp_path / "hi.onnx", opset=ex.supported_opsets()[1])
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hi.onnx", "hi.onnx.data"]
