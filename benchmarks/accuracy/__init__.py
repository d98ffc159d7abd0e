"""Accuracy of dense matchers: the standard protocols, and benchmarks made here that always run.

    python -m benchmarks.accuracy [--benchmark synthetic] [--matchers ...] [options]   # --help lists them

Benchmarks (``--benchmark``):

* ``synthetic`` (default): pairs made from photos (romav2-tiny's held-out photos in ``.tiny-data/heldout``
  when present, else scikit-image's bundled public-domain/CC0 photos) at 512 px long side, warped by random
  homographies with photometric changes, so the ground truth is exact. Reports homography AUC@3/5/10 px
  (mean corner error of a RANSAC homography), the median corner error, and precision@3px (fraction of a
  pair's matches within 3 px of the ground truth, averaged over the pairs).
* ``rendered3d``: rendered pairs of random textured 3D scenes (``romav2_plugin.train.scenes``) with known
  poses and intrinsics, textured with held-out photos only, 512x384; relative pose AUC@5/10/20 degrees as
  MegaDepth-1500 reports it.
* ``megadepth1500`` / ``scannet1500``: relative pose, the usual 1500 pairs (LoFTR scene lists and npz
  files), 5000 balanced samples, essential-matrix RANSAC (OpenCV, else pycolmap), AUC@5/10/20 degrees
  of ``max(rotation error, translation angle error)``, five RANSAC draws per pair as the RoMa protocols.
* ``hpatches``: HPatches sequences, image 1 against 2..6, homography RANSAC, mean corner error
  normalised to a 480-pixel short side, AUC@3/5/10 px (LoFTR's eight sequences excluded).
* ``wxbs``: through the ``wxbs-benchmark`` package (dense transfer of its ground-truth points).

Every matcher plugs in through :class:`Matcher`: ``match_pair(img_A, img_B) -> (kpts_A (N, 2),
kpts_B (N, 2), scores (N,))``, pixel coordinates in the OpenCV convention (top-left pixel centre at
``(0, 0)``) of the images as given. Adapters: ``ours`` (romav2_plugin), ``tiny`` (romav2-tiny,
``--tiny-weights``), ``sift`` (OpenCV SIFT + ratio test), ``official`` (romav2==2.0.1, assembled offline, see
``benchmarks/_official.py``), ``roma`` (romatch), ``loftr`` (kornia), and the ground-truth test doubles
``double`` / ``double-shift<t>`` (exact matches, or shifted by ``t`` px).

Modules: :mod:`~benchmarks.accuracy.data` (pairs and loaders), :mod:`~benchmarks.accuracy.matchers`
(adapters), :mod:`~benchmarks.accuracy.metrics` (metric functions), :mod:`~benchmarks.accuracy.protocols`
(evaluation loops), :mod:`~benchmarks.accuracy.command` (options, report, ``main``). The names below are
re-exported here.
"""

from benchmarks.accuracy.command import (
    BENCHMARKS,
    PAPER,
    default_matchers,
    main,
    parse_args,
    run,
    write_report,
)
from benchmarks.accuracy.data import (
    DATA_HELP,
    HELDOUT,
    HPATCHES_IGNORE,
    MEGADEPTH_SCENES,
    RENDERED_SEED,
    DataMissingError,
    PosePair,
    RenderedPair,
    SyntheticPair,
    WeightsMissingError,
    hpatches_pairs,
    megadepth1500_pairs,
    photometric,
    random_homography,
    rendered_pairs,
    scannet1500_pairs,
    synthetic_images,
    synthetic_pairs,
    warp_image,
)
from benchmarks.accuracy.matchers import (
    DepthWarpDouble,
    LoFTRMatcher,
    Matcher,
    OfficialMatcher,
    RenderedDouble,
    RomaMatcher,
    RoMaV2Matcher,
    ShiftedHomographyDouble,
    SIFTMatcher,
    build_matcher,
    tiny_weights_available,
)
from benchmarks.accuracy.metrics import (
    angle_error_mat,
    angle_error_vec,
    apply_homography,
    corners,
    dlt_homography,
    estimate_homography,
    estimate_pose,
    homography_corner_error,
    match_precision,
    pose_auc,
    pose_threshold,
    relative_pose_error,
)
from benchmarks.accuracy.protocols import (
    evaluate_hpatches,
    evaluate_pose,
    evaluate_rendered3d,
    evaluate_synthetic,
    evaluate_wxbs,
    pose_errors,
    run_rendered3d,
    run_synthetic,
)

__all__ = [
    "BENCHMARKS", "PAPER", "default_matchers", "main", "parse_args", "run", "write_report",
    "DATA_HELP", "HELDOUT", "HPATCHES_IGNORE", "MEGADEPTH_SCENES", "RENDERED_SEED", "DataMissingError", "PosePair",
    "RenderedPair", "SyntheticPair", "WeightsMissingError", "hpatches_pairs", "megadepth1500_pairs", "photometric",
    "random_homography", "rendered_pairs", "scannet1500_pairs", "synthetic_images", "synthetic_pairs", "warp_image",
    "DepthWarpDouble", "LoFTRMatcher", "Matcher", "OfficialMatcher", "RenderedDouble", "RomaMatcher",
    "RoMaV2Matcher", "ShiftedHomographyDouble", "SIFTMatcher", "build_matcher", "tiny_weights_available",
    "angle_error_mat", "angle_error_vec", "apply_homography", "corners", "dlt_homography", "estimate_homography",
    "estimate_pose", "homography_corner_error", "match_precision", "pose_auc", "pose_threshold",
    "relative_pose_error", "evaluate_hpatches", "evaluate_pose", "evaluate_rendered3d", "evaluate_synthetic",
    "evaluate_wxbs", "pose_errors", "run_rendered3d", "run_synthetic",
]
