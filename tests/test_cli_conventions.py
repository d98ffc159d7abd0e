"""The conventions the three commands share: truthful ``--help``, the exit code for a missing optional
dependency or a bad checkpoint, signal handlers restored, signals deferred around a write."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from cli_support import child_env

from romav2_plugin import export as ex
from romav2_plugin import signals
from romav2_plugin.app import cli, errors


def test_export_help_tells_the_truth(capsys):
    with pytest.raises(SystemExit) as e:
        ex.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: romav2-export")
    for opt in ("--batch-size", "--opset", "--overwrite", "exit codes"):
        assert opt in out
    assert "TensorRT" not in out


@pytest.mark.slow  # three subprocesses
def test_hloc_help_without_hloc_prints_usage_and_install_hint(tmp_path):
    code = "import sys; sys.modules['hloc'] = None\nfrom romav2_plugin.app.hloc_command import main\nsys.exit(main(sys.argv[1:]))"
    for argv, rc in ((["--help"], 0), (["match_dense", "--help"], 0)):
        r = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=child_env(), cwd=tmp_path
        )
        assert r.returncode == rc, r.stderr
        assert "usage: python -m romav2_plugin.hloc" in r.stdout and "pip install" in r.stdout
    r = subprocess.run(
        [sys.executable, "-c", code, "match_dense", "--pairs", "p", "--image_dir", ".", "--export_dir", "."],
        capture_output=True, text=True, env=child_env(), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == errors.EXIT_SETUP and "pip install" in r.stderr and "Traceback" not in r.stderr


def test_missing_dependency_and_bad_checkpoint_same_code_in_match_and_export(tmp_path, monkeypatch, capsys):
    bogus = tmp_path / "romav2.0.1.pt"
    bogus.write_bytes(b"not a checkpoint")
    # romav2-export: onnx missing -> 4; bad checkpoint -> 4
    monkeypatch.setattr(ex, "_require_onnx", lambda: (_ for _ in ()).throw(ImportError(ex.EXPORT_HINT)))
    assert ex.main(["--out", str(tmp_path / "x.onnx")]) == errors.EXIT_SETUP
    assert "romav2-plugin[export]" in capsys.readouterr().err
    monkeypatch.setattr(ex, "_require_onnx", lambda: None)
    assert ex.main(["--out", str(tmp_path / "x.onnx"), "--weights", str(bogus)]) == errors.EXIT_SETUP
    assert "checkpoint" in capsys.readouterr().err
    # romav2-match: bad checkpoint -> 4 (h5py missing -> 4: test_cli.py)
    assert (
        cli.main(["--demo", "--weights", str(bogus), "--setting", "turbo", "--out", str(tmp_path / "o")]) == 4
    )
    assert "checkpoint" in capsys.readouterr().err


def test_bad_checkpoint_same_code_in_the_hloc_command(hloc, tmp_path, monkeypatch, capsys):
    """python -m romav2_plugin.hloc: a weights error raised while hloc loads the model -> 4."""
    from romav2_plugin.adapters.hloc import ensure_registered
    from romav2_plugin.app import hloc_command as hcli
    from romav2_plugin.model import RoMaV2

    bogus = tmp_path / "romav2.0.1.pt"
    bogus.write_bytes(b"not a checkpoint")
    ensure_registered()
    monkeypatch.setattr(
        hcli, "run_match_dense", lambda conf, *a, **k: RoMaV2.from_pretrained(conf["model"]["weights"])
    )
    argv = ["match_dense", "--pairs", "p", "--image_dir", ".", "--export_dir", ".", "--weights", str(bogus)]
    assert hcli.main(argv) == errors.EXIT_SETUP
    assert "checkpoint" in capsys.readouterr().err


def test_sigterm_handler_restored_after_each_command(cli_double, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--demo", "--setting", "turbo", "--out", str(tmp_path / "o"), "--no-pictures", "--num-samples", "200"]
    assert cli.main(argv) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_interrupts_hold_a_signal_until_the_block_ends():
    """A SIGTERM inside the block (a checkpoint being written) does not interrupt it; it is raised on leaving,
    through the handler that was in place, and every handler is restored."""
    import os

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    finished = []
    with pytest.raises(signals.Terminated), signals.sigterm_as_interrupt():
        with signals.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # Python runs handlers between bytecodes: it would have raised here
                sum(range(100))
            finished.append(True)
    assert finished == [True]
    assert {s: signal.getsignal(s) for s in before} == before
    with signals.deferred_interrupts():  # nothing caught: nothing raised
        pass
    assert {s: signal.getsignal(s) for s in before} == before
