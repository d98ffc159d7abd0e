"""benchmarks.tiny.compare: training time from a run's log, the table, the per-pair differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.tiny import compare


def _run(tmp_path, name, rows, batch=(4, 2)):
    run = tmp_path / name
    run.mkdir()
    lines = ["global_step,stage,step,lr,pairs_per_s,total"] + [",".join(map(str, r)) for r in rows]
    (run / "log.csv").write_text("\n".join(lines) + "\n")
    stages = [{"name": "matcher", "batch_size": batch[0]}, {"name": "refiners", "batch_size": batch[1]}]
    (run / "model.json").write_text(json.dumps({"train_config": {"stages": stages}}))
    return run


def test_training_time_sums_each_logged_interval(tmp_path):
    # matcher: 10 steps at 2 pairs/s (batch 4: 20 s) then 10 at 4 pairs/s (10 s); refiners: 5 steps at 1 pair/s
    # (batch 2: 10 s); the refiner stage's steps restart at 0
    run = _run(tmp_path, "r", [(10, "matcher", 10, 0, 2.0, 1), (20, "matcher", 20, 0, 4.0, 1),
                                (25, "refiners", 5, 0, 1.0, 1)])
    t = compare.training_time(run)
    assert t == {"matcher": {"steps": 20, "seconds": pytest.approx(30.0)},
                 "refiners": {"steps": 5, "seconds": pytest.approx(10.0)}}
    assert compare.training_time(tmp_path / "missing") == {}


def _row(label, corner, pose, run=None):
    synth = {"median_corner_error_px": corner[0], "precision@3px": 0.8, "auc@3px": 0.6, "auc@10px": 0.8,
             "per_pair": [{"corner_error_px": c} for c in corner]}
    r3d = {"auc@5": 0.5, "auc@10": 0.6, "auc@20": 0.7, "median_pose_error_deg": pose[0], "failures": 1,
           "per_pair": [{"pose_error_deg": p} for p in pose]}
    return {"label": label, "weights": str(run or "tiny"), "training": compare.training_time(run) if run else {},
            "synthetic": synth, "rendered3d": r3d}


def test_table_and_per_pair_differences(tmp_path):
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [_row("v1", [1.0, 2.0, 3.0], [1.0, 5.0], run), _row("v2", [0.5, 2.5, 3.0], [0.5, 4.0], run)]
    md = compare.write(rows, {"machine": "m", "command": "c", "note": "equal time"}, tmp_path / "out").read_text()
    assert "| v1 | " in md and "| v2 | " in md and "equal time" in md
    assert "0.01" in md  # 20 s of training, in hours
    # corner error differences -0.5, +0.5, 0: median 0, one worse, one better; pose -0.5, -1.0: both better
    assert "median +0.000 px, 1 pairs worse, 1 better; difference of the medians +0.500 px" in md
    assert "median -0.75 deg, 0 pairs worse, 2 better; difference of the medians -0.75 deg" in md
    data = json.loads((tmp_path / "out" / "tiny_candidates_cpu.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["v1", "v2"]


def test_every_candidate_is_set_against_the_shipped_row(tmp_path):
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [_row("c1", [1.0, 2.0], [1.0, 2.0], run), _row("c2", [2.0, 3.0], [1.0, 2.0], run),
            _row("shipped", [1.0, 2.0], [1.0, 2.0])]
    md = compare.write(rows, {"machine": "m", "command": "c"}, tmp_path / "out").read_text()
    assert "Per pair, c1 against shipped" in md and "Per pair, c2 against shipped" in md
    assert "Per pair, shipped against" not in md and "c2 against c1" not in md


def test_median_gap_and_its_bootstrap_interval():
    def rows(values):
        return {"per_pair": [{"e": v} for v in values]}

    base = rows([0.3, 0.9, 1.4, 2.0, 5.0, 0.7, 1.1])
    same = compare.median_gap(base, base, "e")
    assert same == {"gap": 0.0, "low": 0.0, "high": 0.0}
    shifted = compare.median_gap(base, rows([v + 0.25 for v in [0.3, 0.9, 1.4, 2.0, 5.0, 0.7, 1.1]]), "e")
    assert shifted["gap"] == pytest.approx(0.25) and shifted["low"] == pytest.approx(0.25)
    assert shifted["high"] == pytest.approx(0.25)
    # the two largest errors worse, the rest equal: the medians agree but a resample can move them apart
    noisy = compare.median_gap(base, rows([0.3, 0.9, 1.4, 4.0, 9.0, 0.7, 1.1]), "e")
    assert noisy["gap"] == pytest.approx(0.0) and noisy["low"] <= 0.0 < noisy["high"]
    # pairs without a value on either side are left out; none at all gives no interval
    assert compare.median_gap(rows([1.0, None]), rows([2.0, 5.0]), "e")["gap"] == pytest.approx(1.0)
    assert compare.median_gap(rows([None]), rows([1.0]), "e") == {"gap": None, "low": None, "high": None}


def test_a_candidate_without_weights_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--candidate", f"x={tmp_path}"])
    assert "RUN/model.pt" in capsys.readouterr().err


def test_render_rewrites_the_markdown_from_the_json(tmp_path):
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [_row("v1", [1.0], [1.0], run)]
    from benchmarks._common import machine_info

    meta = {"machine": machine_info("cpu"), "command": "cmd", "commit": "abc1234", "date": "d", "note": "n"}
    md = compare.write(rows, meta, tmp_path / "out").read_text()
    assert "- Machine: " in md and "cores" in md and "- Commit: abc1234" in md
    (tmp_path / "out" / "tiny_candidates_cpu.md").unlink()
    assert compare.render(tmp_path / "out").read_text() == md


def test_versus_sets_two_named_rows_against_each_other(tmp_path):
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [_row("v1, 2 parts", [1.0, 2.0, 3.0], [1.0, 5.0], run), _row("d, 2 parts", [0.5, 2.5, 3.0], [0.5, 4.0], run),
            _row("shipped", [1.0, 2.0, 3.0], [1.0, 5.0])]
    meta = {"machine": "m", "command": "c", "versus": [["d, 2 parts", "v1, 2 parts"]]}
    md = compare.write(rows, meta, tmp_path / "out").read_text()
    block = md.split("Per pair, d, 2 parts against v1, 2 parts (positive = worse):")[1]
    assert "median +0.000 px, 1 pairs worse, 1 better; difference of the medians +0.500 px" in block
    assert "median -0.75 deg, 0 pairs worse, 2 better" in block
    assert "Versus" not in md  # a field of the file, not a provenance line


def test_versus_added_to_a_measured_file_by_render(tmp_path, capsys):
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [_row("a", [1.0, 2.0], [1.0, 2.0], run), _row("b", [2.0, 3.0], [1.0, 3.0], run)]
    compare.write(rows, {"machine": "m", "command": "c"}, tmp_path / "out")
    before = json.loads((tmp_path / "out" / "tiny_candidates_cpu.json").read_text())["rows"]
    assert compare.main(["--render", "--out", str(tmp_path / "out"), "--versus", "a=b"]) == 0
    assert "Per pair, a against b (positive = worse):" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "tiny_candidates_cpu.json").read_text())
    assert data["rows"] == before and data["meta"]["versus"] == [["a", "b"]]
    assert "added from the JSON (nothing rerun) by: `" in (tmp_path / "out" / "tiny_candidates_cpu.md").read_text()
    compare.render(tmp_path / "out", [("a", "b")])  # given again: recorded once
    assert json.loads((tmp_path / "out" / "tiny_candidates_cpu.json").read_text())["meta"]["versus"] == [["a", "b"]]
    with pytest.raises(SystemExit, match="no row labelled 'c'; the rows are 'a', 'b'"):
        compare.main(["--render", "--out", str(tmp_path / "out"), "--versus", "a=c"])
    with pytest.raises(SystemExit, match="CANDIDATE=BASELINE"):
        compare.main(["--render", "--out", str(tmp_path / "out"), "--versus", "a"])


def test_versus_naming_an_unknown_row_is_refused_before_measuring(tmp_path, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    monkeypatch.setattr(compare, "measure", lambda *a, **k: pytest.fail("measured before checking --versus"))
    with pytest.raises(SystemExit, match="no row labelled 'v9'"):
        compare.main(["--candidate", f"x={run}", "--versus", "x=v9", "--out", str(tmp_path / "out")])


def test_real_photographs_columns_from_hloc_peers(tmp_path, monkeypatch):
    """measure_real runs hloc_peers on the folder with the row's weights and reads its tiny row."""
    seen = []

    def fake_run(cmd, check, stdout):
        seen.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        rows = [{"method": "tiny", "registered": 0, "verified_pairs": 1, "inlier_matches": 603, "matches": 4970}]
        (out / "hloc_peers_real_cpu.json").write_text(json.dumps({"views": 2, "rows": rows}))

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    got = compare.measure_real("runs/x/model.pt", tmp_path / "photos", tmp_path / "s0")
    assert got == {"images": 2, "registered": 0, "verified_pairs": 1, "inlier_matches": 603, "matches": 4970}
    assert seen[0][seen[0].index("--tiny-weights") + 1] == "runs/x/model.pt"
    assert "--tiny-weights" not in compare.measure_real("tiny", tmp_path / "photos", tmp_path / "s1") and \
        "--tiny-weights" not in seen[1]
    run = _run(tmp_path, "a", [(10, "matcher", 10, 0, 2.0, 1)])
    rows = [{**_row("a", [1.0], [1.0], run), "real": got}, _row("b", [1.0], [1.0], run)]
    md = compare.write(rows, {"machine": "m", "command": "c"}, tmp_path / "out").read_text()
    assert "| real photographs: registered | real photographs: verified inliers / matches |" in md
    assert "| 0 / 2 | 603 / 4970 |" in md and md.rstrip().count("| - | - |") >= 1


def test_real_images_that_are_not_a_folder_are_refused(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    monkeypatch.setattr(compare, "measure", lambda *a, **k: pytest.fail("measured before checking the folder"))
    with pytest.raises(SystemExit):
        compare.main(["--candidate", f"x={run}", "--real-images", str(tmp_path / "nope")])
    assert "not a folder" in capsys.readouterr().err
