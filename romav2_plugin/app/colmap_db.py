"""``romav2-match --pairs ... --colmap-db database.db``: a COLMAP database written pair by pair.

What a pair adds, in one SQLite transaction (an interrupted run loses at most the pair being written): the
images (and their cameras, rigs and frames) the first time they appear, the keypoints each match lands on
(shared across all pairs of an image: :mod:`romav2_plugin.keypoints`, cell grid ``cell_size`` and
``max_error`` in pixels), the one-to-one matches, and the two-view geometry verified by pycolmap
(``estimate_two_view_geometry``, COLMAP's RANSAC). ``colmap mapper``, ``glomap mapper`` and pycolmap's
``incremental_mapping`` / ``global_mapping`` read the file as it is.

Cameras: ``SIMPLE_RADIAL`` with COLMAP's prior focal length ``1.2 * max(width, height)`` (not marked as a
prior), principal point at the centre, sizes of the image as displayed (EXIF orientation applied, as the
matcher's coordinates); one camera per (folder, size) (``camera_mode="auto"``, as COLMAP's ``AUTO`` without
EXIF focal lengths) or one per image (``"per-image"``). Keypoints are stored in COLMAP's convention (pixel
centre at +0.5).

Resume: the run's options (``setting``, ``weights_sha256``, ``seed``, ``num_samples``, ``min_overlap``,
``cell_size``, ``max_error``) are kept in an extra table, ``romav2_plugin_run`` (COLMAP ignores it); a pair
whose matches and two-view geometry are both in the database is skipped (in either order of its names).
Keypoints are read back and extended, never renumbered.

A database that holds cameras or images that this command did not write is refused (exit 2; read only,
so it stays byte-identical) unless ``add=True`` (``--colmap-db-add``): then images already there are reused
by name, their keypoints kept (ours are appended after theirs, with neutral scale/orientation/affine columns
where the table has them), and pairs already matched there are skipped.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from romav2_plugin.app.errors import EXIT_RUNTIME, EXIT_USAGE, CommandError, is_disk_full, missing_dependency
from romav2_plugin.app.results import WriteFailed, hold_writer_lock
from romav2_plugin.keypoints import ImageKeypoints, opencv_to_colmap, unique_matches
from romav2_plugin.signals import deferred_interrupts

__all__ = ["RUN_TABLE", "CAMERA_MODES", "ColmapDatabase", "import_pycolmap", "pycolmap_features"]

RUN_TABLE = "romav2_plugin_run"
CAMERA_MODES = ("auto", "per-image")
RUN_KEYS = ("setting", "weights_sha256", "seed", "num_samples", "min_overlap", "cell_size", "max_error")
_SQLITE_SIGNATURE = b"SQLite format 3\x00"


def import_pycolmap(what: str = "--colmap-db"):
    try:
        import pycolmap
    except ImportError:
        raise missing_dependency(what, "pycolmap", "colmap") from None
    return pycolmap


def pycolmap_features() -> dict[str, bool]:
    """What the installed pycolmap offers (global mapping is GLOMAP inside COLMAP, pycolmap >= 3.13 / 4.x)."""
    pycolmap = import_pycolmap()
    return {"global_mapping": hasattr(pycolmap, "global_mapping"), "version": pycolmap.__version__}


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


class ColmapDatabase:
    """The database ``romav2-match --colmap-db`` writes (see the module docstring).

    Args:
        path: the database file (created when missing).
        image_dir: folder the pair names are relative to (image names in the database are these names).
        cell_size, max_error: keypoint grid and assignment radius, pixels (:class:`ImageKeypoints`).
        add: add to a database that holds other cameras/images.
        camera_mode: ``"auto"`` (one camera per folder and size) or ``"per-image"``.
    """

    def __init__(
        self, path: Path, *, cell_size: float, max_error: float, add: bool = False, camera_mode: str = "auto"
    ) -> None:
        if camera_mode not in CAMERA_MODES:
            raise CommandError(f"camera mode must be one of {', '.join(CAMERA_MODES)}, got {camera_mode!r}", EXIT_USAGE)
        ImageKeypoints(cell_size, max_error)  # checks the two numbers
        self.path = Path(path)
        self.cell_size, self.max_error = float(cell_size), float(max_error)
        self.add, self.camera_mode = add, camera_mode
        self.attrs: dict[str, Any] = {}
        self._db = None
        self._image_ids: dict[str, int] = {}
        self._camera_of: dict[str, int] = {}
        self._cameras: dict[Any, int] = {}
        self._kps: dict[str, ImageKeypoints] = {}
        self._stored: dict[str, np.ndarray] = {}  # the keypoint table as read (all its columns)
        self._rig_of: dict[int, int] = {}  # camera id -> its trivial rig's id

    # ------------------------------------------------------------------------------------- opening
    def hold_lock(self) -> None:
        hold_writer_lock(self.path)

    def inspect(self) -> dict[str, Any]:
        """Read-only look at an existing file: the recorded run options (``{}`` for none); refuses (exit 2) a
        file that is not a COLMAP database, or one with cameras/images we did not write unless ``add``."""
        p = self.path
        if not p.exists():
            return {}
        if not p.is_file():
            raise CommandError(f"--colmap-db {p} is not a regular file; give a database file name.", EXIT_USAGE)
        with open(p, "rb") as f:
            head = f.read(16)
        if head == b"":
            raise CommandError(f"--colmap-db {p} is an empty file that romav2-match did not write; remove it "
                               "or choose another --colmap-db.", EXIT_USAGE)
        if head != _SQLITE_SIGNATURE:
            raise CommandError(f"--colmap-db {p} is not an SQLite (COLMAP) database; it was left as it is. "
                               "Choose another --colmap-db.", EXIT_USAGE)
        try:
            con = _read_only(p)
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                attrs: dict[str, Any] = {}
                if RUN_TABLE in tables:
                    attrs = {k: json.loads(v) for k, v in con.execute(f"SELECT key, value FROM {RUN_TABLE}")}
                counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                          for t in ("cameras", "images") if t in tables}
            finally:
                con.close()
        except sqlite3.Error as e:
            raise CommandError(f"--colmap-db {p} cannot be read as an SQLite database ({e}); it was left as it "
                               "is. Choose another --colmap-db.", EXIT_USAGE) from None
        if tables and not {"cameras", "images"} <= tables:
            raise CommandError(f"--colmap-db {p} is an SQLite database but not COLMAP's (no cameras/images "
                               "tables); it was left as it is. Choose another --colmap-db.", EXIT_USAGE)
        if not attrs and any(counts.values()) and not self.add:
            raise CommandError(
                f"--colmap-db {p} holds {counts.get('images', 0)} image(s) and {counts.get('cameras', 0)} "
                "camera(s) that romav2-match did not write; it was left as it is. Pass --colmap-db-add to add "
                "these pairs' images, keypoints and matches to it, or choose another --colmap-db.",
                EXIT_USAGE,
            )
        self.attrs = attrs
        return attrs

    def option_diff(self, options: dict[str, Any]) -> list[str]:
        """The recorded options that differ from ``options`` (only keys both have)."""
        out = []
        for k in RUN_KEYS:
            if k in self.attrs and k in options and self.attrs[k] != _jsonable(options[k]):
                out.append(f"{k}: {self.attrs[k]!r} in the database, {_jsonable(options[k])!r} now")
        return out

    def check_options(self, options: dict[str, Any]) -> None:
        diff = self.option_diff(options)
        if diff:
            raise CommandError(
                f"{self.path} was written with other options ({'; '.join(diff)}). Use the same options to "
                "resume, or choose another --colmap-db.",
                EXIT_USAGE,
            )

    def done_pairs(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The pairs of ``pairs`` whose matches and two-view geometry are already in the database."""
        if not self.path.exists():
            return set()
        db = self._open()
        ids = {im.name: im.image_id for im in db.read_all_images()}
        done = set()
        for a, b in pairs:
            ia, ib = ids.get(a), ids.get(b)
            if ia is not None and ib is not None and ia != ib:
                if db.exists_matches(ia, ib) and db.exists_two_view_geometry(ia, ib):
                    done.add((a, b))
        return done

    # ------------------------------------------------------------------------------------- writing
    def begin(self, meta: dict[str, Any]) -> None:
        """Create the database if needed, check and record the run options, load what is there."""
        self.check_options(meta)
        new_attrs = {k: _jsonable(meta[k]) for k in RUN_KEYS if k in meta and k not in ("cell_size", "max_error")}
        new_attrs.update(cell_size=self.cell_size, max_error=self.max_error)
        db = self._open()  # creates COLMAP's tables
        try:
            self.close()
            con = sqlite3.connect(self.path)
            with con:
                con.execute(f"CREATE TABLE IF NOT EXISTS {RUN_TABLE} (key TEXT PRIMARY KEY NOT NULL, value TEXT)")
                con.executemany(f"INSERT OR REPLACE INTO {RUN_TABLE} VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in new_attrs.items()])
            con.close()
        except sqlite3.Error as e:
            raise WriteFailed(f"cannot write {self.path} ({e})", EXIT_RUNTIME) from None
        self.attrs.update(new_attrs)
        db = self._open()
        for im in db.read_all_images():
            self._image_ids[im.name] = im.image_id
            self._camera_of[im.name] = im.camera_id
        for rig in db.read_all_rigs():
            self._rig_of.setdefault(rig.ref_sensor_id.id, rig.rig_id)
        cams = {c.camera_id: c for c in db.read_all_cameras()}
        for name, cid in self._camera_of.items():  # reuse only cameras as this writer makes them
            cam = cams[cid]
            if cam.model_name == "SIMPLE_RADIAL" and np.allclose(cam.params, _default_params(cam.width, cam.height)):
                self._cameras.setdefault(self._camera_key(name, (cam.height, cam.width)), cid)

    def _open(self):
        if self._db is None:
            pycolmap = import_pycolmap()
            self._db = pycolmap.Database.open(self.path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _camera_key(self, name: str, hw) -> Any:
        return name if self.camera_mode == "per-image" else (str(Path(name).parent), int(hw[0]), int(hw[1]))

    def _keypoints(self, db, name: str) -> ImageKeypoints:
        kp = self._kps.get(name)
        if kp is None:
            iid = self._image_ids.get(name)
            stored = db.read_keypoints(iid) if iid is not None and db.exists_keypoints(iid) else None
            if stored is not None and len(stored):
                self._stored[name] = stored
            kp = ImageKeypoints(self.cell_size, self.max_error, None if stored is None else stored[:, :2])
            self._kps[name] = kp
        return kp

    def _camera_for(self, db, pycolmap, name: str, hw):
        """The camera ``name`` has or will get (not written here)."""
        cid = self._camera_of.get(name) or self._cameras.get(self._camera_key(name, hw))
        if cid is not None:
            return db.read_camera(cid)
        h, w = int(hw[0]), int(hw[1])
        return pycolmap.Camera(model="SIMPLE_RADIAL", width=w, height=h, params=_default_params(w, h))

    def _ensure_image(self, db, pycolmap, name: str, hw) -> int:
        iid = self._image_ids.get(name)
        if iid is not None:
            return iid
        key = self._camera_key(name, hw)
        cid = self._cameras.get(key)
        if cid is None:
            h, w = int(hw[0]), int(hw[1])
            cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=w, height=h, params=_default_params(w, h))
            cam.camera_id = cid = db.write_camera(cam)
            self._cameras[key] = cid
        if cid not in self._rig_of:  # a trivial rig per camera (COLMAP >= 3.12 needs rigs and frames)
            rig = pycolmap.Rig()
            rig.add_ref_sensor(db.read_camera(cid).sensor_id)
            self._rig_of[cid] = db.write_rig(rig)
        image = pycolmap.Image(name=name, camera_id=cid)
        image.image_id = iid = db.write_image(image)
        frame = pycolmap.Frame()
        frame.rig_id = self._rig_of[cid]
        frame.add_data_id(image.data_id)
        db.write_frame(frame)
        self._image_ids[name], self._camera_of[name] = iid, cid
        return iid

    def _stored_rows(self, name: str, xy: np.ndarray) -> np.ndarray:
        """The image's full keypoint table: what was stored, then ``xy``'s new rows in the table's columns."""
        old = self._stored.get(name)
        ncol = 2 if old is None else old.shape[1]
        n_old = 0 if old is None else len(old)
        new = np.zeros((len(xy) - n_old, ncol), np.float32)
        new[:, :2] = xy[n_old:]
        if ncol == 4:
            new[:, 2] = 1.0  # scale, orientation 0
        elif ncol == 6:
            new[:, 2], new[:, 5] = 1.0, 1.0  # identity affine shape
        return new if old is None else np.concatenate([old.astype(np.float32), new])

    def write_pair(self, name_A: str, name_B: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                   pair_meta: dict[str, Any], *, saved_note: str = "") -> None:
        """Keypoints, one-to-one matches and the verified two-view geometry of one pair, in one transaction.
        Raises :class:`WriteFailed` (disk full, I/O error); what was committed before stays."""
        pycolmap = import_pycolmap()
        try:
            db = self._open()
            kA, kB = self._keypoints(db, name_A), self._keypoints(db, name_B)
            conf = np.asarray(arrays["confidence"], dtype=np.float64)
            nA0, nB0 = len(kA), len(kB)
            ids_A = kA.assign(opencv_to_colmap(arrays["keypoints_A"]), conf)
            ids_B = kB.assign(opencv_to_colmap(arrays["keypoints_B"]), conf)
            matches = unique_matches(ids_A, ids_B, conf)
            cam_A = self._camera_for(db, pycolmap, name_A, pair_meta["image_hw_A"])
            cam_B = self._camera_for(db, pycolmap, name_B, pair_meta["image_hw_B"])
            tvg = pycolmap.estimate_two_view_geometry(
                cam_A, kA.xy, cam_B, kB.xy, matches, pycolmap.TwoViewGeometryOptions()
            ) if len(matches) else pycolmap.TwoViewGeometry()
            # only writes from here: stop signals wait for the commit (pycolmap's transaction commits also
            # when an exception leaves it)
            with deferred_interrupts(), pycolmap.DatabaseTransaction(db):
                iA = self._ensure_image(db, pycolmap, name_A, pair_meta["image_hw_A"])
                iB = self._ensure_image(db, pycolmap, name_B, pair_meta["image_hw_B"])
                for name, iid, kp, n0 in ((name_A, iA, kA, nA0), (name_B, iB, kB, nB0)):
                    if len(kp) != n0 or not db.exists_keypoints(iid):
                        rows = self._stored_rows(name, kp.xy)
                        if db.exists_keypoints(iid):
                            db.update_keypoints(iid, rows)
                        else:
                            db.write_keypoints(iid, rows)
                        self._stored[name] = rows
                if db.exists_matches(iA, iB):  # a pair left half-written by a failed write: redone
                    db.delete_matches(iA, iB)
                if db.exists_two_view_geometry(iA, iB):
                    db.delete_two_view_geometry(iA, iB)
                db.write_matches(iA, iB, matches)
                db.write_two_view_geometry(iA, iB, tvg)
        except (OSError, RuntimeError) as e:
            self._forget(name_A, name_B)
            self.close()
            why = "the disk is full" if is_disk_full(e) else f"cannot write {self.path} ({e})"
            raise WriteFailed(f"{why}. {saved_note} Rerun the same command to resume.", EXIT_RUNTIME) from None
        except BaseException:
            self._forget(name_A, name_B)
            raise
        pair_meta["colmap_matches"] = len(matches)
        pair_meta["colmap_inliers"] = len(tvg.inlier_matches)

    def _forget(self, *names: str) -> None:
        """After a failed transaction the in-memory keypoints may be ahead of the file: reread them."""
        for n in names:
            self._kps.pop(n, None)
            self._stored.pop(n, None)


def _default_params(width: int, height: int) -> list[float]:
    """SIMPLE_RADIAL ``f, cx, cy, k``: COLMAP's prior focal length ``1.2 * max(w, h)``, the centre, no distortion."""
    return [1.2 * max(width, height), width / 2, height / 2, 0.0]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v
