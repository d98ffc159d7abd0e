"""romav2_plugin.distributed: --engine ray on a local Ray cluster (2 CPU workers) gives the single-process files.

A very small seeded random model (official layout, model card) at the 'tiny' setting keeps each pair cheap;
the same weights, seed and options go through the single-process path once (module fixture, one torch
thread like each 1-CPU worker) and every Ray run is compared with it pair for pair, array for array, attribute for attribute (the per-pair timing
``time_match_s`` excepted: it differs between two single-process runs too).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from romav2_plugin.app import cli, matching

COMMON = ["--setting", "tiny", "--num-samples", "150", "--min-overlap", "0", "--device", "cpu", "--seed", "3"]
N_OK = 4  # matchable pairs; one more pair has a truncated image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from romav2_plugin.testing import make_micro_weights

    root = tmp_path_factory.mktemp("dist")
    weights = make_micro_weights(root / "micro.pt")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "sub/c.png", "d.jpg", "e.png"]
    sizes = [(128, 96), (128, 96), (96, 128), (160, 120), (128, 96)]
    for name, size in zip(names, sizes):
        small = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(images / name)
    good = (images / "a.png").read_bytes()
    (images / "broken.png").write_bytes(good[: len(good) // 2])  # header fine, data truncated
    pairs = [("a.png", "b.png"), ("b.png", "sub/c.png"), ("sub/c.png", "d.jpg"), ("e.png", "a.png"),
             ("a.png", "broken.png")]  # fmt: skip
    pairs_txt = root / "pairs.txt"
    pairs_txt.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    ref = root / "ref.h5"
    args = [
        "--pairs",
        str(pairs_txt),
        "--image-dir",
        str(images),
        "--out",
        str(ref),
        "--weights",
        str(weights),
    ]
    # one torch thread, as in each 1-CPU worker: torch's CPU kernels are not bitwise reproducible across thread
    # counts (2 threads vs 1 differ by float32 rounding, about 1e-7 relative, in the same matches)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            cli.main(args + COMMON) == cli.EXIT_PAIRS_FAILED
        )  # the broken pair fails, the others are written
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "weights": weights, "images": images, "pairs": pairs_txt, "ref": ref, "args": args}


@pytest.fixture(scope="module")
def cluster():
    # a busy machine can take more than Ray's default 60 s to answer the start-up RPCs (read at import)
    os.environ.setdefault("RAY_gcs_server_request_timeout_seconds", "300")
    import ray  # the [dev] extra has it: without ray these tests fail, they do not skip

    from romav2_plugin.distributed.cluster import _children, _shutdown_failed_start

    for attempt in range(3):  # the raylet can miss Ray's 30 s start-up deadline on a busy machine
        before = _children()
        try:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=80 << 20,
                log_to_driver=False,
            )
            break
        except Exception:
            _shutdown_failed_start(ray, before)
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def _contents(path: Path) -> tuple[dict, dict]:
    """(root attributes, {group: (attributes without the timing, {dataset: array})})"""
    out = {}
    with h5py.File(path, "r") as f:
        root = {k: f.attrs[k] for k in f.attrs}

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "complete" in obj.attrs:
                attrs = {k: obj.attrs[k] for k in obj.attrs if k != "time_match_s"}
                out[name] = (attrs, {k: obj[k][()] for k in obj})

        f.visititems(visit)
    return root, out


def _assert_same(path: Path, ref: Path) -> None:
    root, groups = _contents(path)
    root_ref, groups_ref = _contents(ref)
    assert root.keys() == root_ref.keys()
    for k in root_ref:
        np.testing.assert_array_equal(root[k], root_ref[k], err_msg=f"root attribute {k}")
    assert sorted(groups) == sorted(groups_ref)
    assert len(groups) == N_OK
    for key, (attrs, arrays) in groups_ref.items():
        got_attrs, got_arrays = groups[key]
        assert got_attrs.keys() == attrs.keys(), key
        for k in attrs:
            np.testing.assert_array_equal(got_attrs[k], attrs[k], err_msg=f"{key} attribute {k}")
        assert got_arrays.keys() == arrays.keys(), key
        for k in arrays:
            assert got_arrays[k].dtype == arrays[k].dtype, (key, k)
            np.testing.assert_array_equal(got_arrays[k], arrays[k], err_msg=f"{key}/{k}")  # bit for bit
    assert any(len(a["confidence"]) > 0 for _, a in groups_ref.values())  # not a comparison of empties


def _run(data, out, **kw):
    from romav2_plugin.distributed import match_pairs

    opts = dict(
        weights=str(data["weights"]), setting="tiny", seed=3, num_samples=150, min_overlap=0.0, device="cpu"
    )
    opts.update(num_workers=2, num_cpus_per_worker=1, progress=False)
    opts.update(kw)
    return match_pairs(data["pairs"], data["images"], out, **opts)


@pytest.mark.slow  # a local Ray cluster
def test_same_file_as_one_process(data, cluster, tmp_path):
    out = tmp_path / "ray.h5"
    run = _run(data, out, batch_size=2)
    assert run.code == cli.EXIT_PAIRS_FAILED  # the broken pair, reported as in one process
    assert run.n_done == N_OK and run.workers == 2
    assert [(a, b) for a, b, _ in run.failures] == [("a.png", "broken.png")]
    assert "truncated" in run.failures[0][2]
    _assert_same(out, data["ref"])


@pytest.mark.slow  # a local Ray cluster
def test_worker_killed_mid_run(data, cluster, tmp_path):
    marker = tmp_path / "died"
    out = tmp_path / "ray.h5"
    run = _run(data, out, batch_size=1, _fault={"die_after": 2, "marker": str(marker)})
    assert marker.exists()  # a worker did exit in the middle of the run
    assert run.n_done == N_OK and len(run.failures) == 1
    _assert_same(out, data["ref"])


@pytest.mark.slow  # a local Ray cluster
def test_driver_interrupted_then_resumed_by_the_command(data, cluster, tmp_path, capsys):
    out = tmp_path / "ray.h5"
    written = []

    def stop_after_two(a, b):
        written.append((a, b))
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(data, out, batch_size=1, on_pair_written=stop_after_two)
    _, groups = _contents(out)
    assert len(groups) == 2  # what was written before the interruption is kept, nothing half-written
    args = data["args"][:-4] + ["--out", str(out), "--weights", str(data["weights"])]
    rc = cli.main(
        args + COMMON + ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "1"]
    )
    assert rc == cli.EXIT_PAIRS_FAILED
    err = capsys.readouterr().err
    assert "2 of 5 pairs already in" in err
    _assert_same(out, data["ref"])


def test_without_ray_the_named_error_before_the_model(data, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(matching, "load_model", no_model)
    rc = cli.main(data["args"][:-4] + ["--out", str(tmp_path / "x.h5")] + COMMON + ["--engine", "ray"])
    assert rc == cli.EXIT_SETUP
    err = capsys.readouterr().err
    assert 'pip install "romav2-plugin[ray]"' in err and "--engine ray" in err
    assert not (tmp_path / "x.h5").exists()


def test_engine_ray_needs_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["a.png", "b.png", "--engine", "ray"])
    assert e.value.code == 2
    assert "--engine ray applies to --pairs only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- hloc
def test_hloc_without_ray_the_named_error(data, hloc, monkeypatch, tmp_path, capsys):
    from romav2_plugin.app import hloc_command

    monkeypatch.setitem(sys.modules, "ray", None)
    rc = hloc_command.main(["match_dense", "--pairs", str(data["pairs"]), "--image_dir", str(data["images"]),
                        "--export_dir", str(tmp_path), "--engine", "ray"])  # fmt: skip
    assert rc == cli.EXIT_SETUP
    assert 'pip install "romav2-plugin[ray]"' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _datasets(f) -> dict:
    items = {}
    f.visititems(lambda n, o: items.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return items


@pytest.mark.slow  # a local Ray cluster
def test_hloc_same_files_as_match_dense_main(data, hloc, cluster, tmp_path):
    from romav2_plugin.adapters.hloc import ensure_registered
    from romav2_plugin.app.hloc import run_match_dense
    from romav2_plugin.distributed import hloc_match_dense

    md = ensure_registered()
    conf = {**md.confs["romav2_fast"]}
    conf["model"] = {
        **conf["model"],
        "weights": str(data["weights"]),
        "setting": "tiny",
        "max_num_matches": 150,
    }
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.png b.png\nb.png sub/c.png\nsub/c.png a.png\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each 1-CPU worker (see the data fixture): bitwise equality needs it
    try:
        ref = run_match_dense(conf, pairs, data["images"], tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    marker = tmp_path / "died"
    got = hloc_match_dense(conf, pairs, data["images"], tmp_path / "ray", num_workers=2, num_cpus_per_worker=1,
                           batch_size=1, progress=False, _fault={"die_after": 1, "marker": str(marker)})  # fmt: skip
    assert marker.exists()
    for a, b in zip(ref, got):
        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
            items_a, items_b = _datasets(fa), _datasets(fb)
            assert sorted(items_a) == sorted(items_b) and items_a
            for k in items_a:
                if np.issubdtype(items_a[k].dtype, np.floating):
                    # float32 rounding apart: on an AMD EPYC (2026-11-30) a 1-CPU Ray worker's keypoints0 and
                    # scores differed from this process's by one ulp in some entries (7.6e-6 px, 6e-8), with the
                    # same matches; the Intel Xeon of the earlier runs gave equal bits
                    np.testing.assert_allclose(items_b[k], items_a[k], rtol=1e-6, atol=1e-6, err_msg=k)
                else:
                    np.testing.assert_array_equal(items_b[k], items_a[k], err_msg=k)
    assert not list((tmp_path / "ray").glob("*.ray-dense.h5"))  # the cache is gone once the run completed


@pytest.mark.slow  # a local Ray cluster
def test_colmap_database_through_ray(data, cluster, tmp_path):
    """--colmap-db --engine ray: the same pairs job writes the database on the driver; same images, pairs and
    (the matches being the same) the same number of one-to-one matches as one process."""
    pycolmap = pytest.importorskip("pycolmap")
    args = data["args"][:-4] + ["--weights", str(data["weights"])]  # without --out
    local, ray_db = tmp_path / "local.db", tmp_path / "ray.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args + COMMON + ["--colmap-db", str(local)]) == cli.EXIT_PAIRS_FAILED
    finally:
        torch.set_num_threads(threads)
    ray_args = ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1"]
    assert cli.main(args + COMMON + ["--colmap-db", str(ray_db)] + ray_args) == cli.EXIT_PAIRS_FAILED

    def contents(path):
        with pycolmap.Database.open(path) as db:
            ims = {im.image_id: im.name for im in db.read_all_images()}
            pairs = {}
            for i in ims:
                for j in ims:
                    if i < j and db.exists_matches(i, j):
                        pairs[tuple(sorted((ims[i], ims[j])))] = len(db.read_matches(i, j))
            return sorted(ims.values()), pairs

    names, pairs = contents(local)
    names_ray, pairs_ray = contents(ray_db)
    assert names == names_ray and pairs.keys() == pairs_ray.keys() and len(pairs) == N_OK
    for k in pairs:
        assert abs(pairs[k] - pairs_ray[k]) <= 0.1 * pairs[k] + 2, (k, pairs[k], pairs_ray[k])
