"""Scale-out on Ray: many pairs over every GPU (or CPU) of a host or a cluster, into the same files.

Two entry points, both resumable and writing exactly what the single-process paths write:

* :func:`match_pairs` (:mod:`.pairs`): ``romav2-match --pairs ... --engine ray``: the pairs job of
  :mod:`romav2_plugin.app.pairs` with the Ray executor; the same HDF5 results file (one group per pair, keyed
  by name: the file does not depend on the order in which pairs finish);
* :func:`hloc_match_dense` (:mod:`.hloc`): ``python -m romav2_plugin.hloc match_dense ... --engine ray``, a
  drop-in for ``hloc.match_dense.main``: only hloc's dense stage runs on the workers; the features/matches
  files are hloc's.

How it runs (:mod:`.cluster`). Ray actors load the model once; the driver hands out batches with
backpressure and is the single writer: each pair is written and flushed as soon as its batch comes back.

Faults. A worker that dies is restarted by Ray (``max_restarts``) and the pairs of its unfinished batches go
back to the queue; a pair during which workers died ``max_attempts`` times is reported as failed (a poison
pair must not stop the run). A pair that fails for its own reasons (unreadable image, ...) is reported and
skipped as in the single-process path. A driver crash loses only the pairs in flight; rerunning the same
command skips the finished pairs.

Where the workers run. ``address=None`` starts a local Ray cluster on this machine (all of its GPUs, or
its CPUs); ``address="auto"`` joins the cluster started with ``ray start --head`` on this machine;
``"HOST:PORT"`` or ``"ray://HOST:10001"`` joins a remote one. Every node needs romav2-plugin (and hloc for
:func:`hloc_match_dense`) installed, the images under the same path, and the weights file under the same
path (the default official weights are downloaded once per node into its cache; ``tiny`` ships with the
package).

Ray is optional: ``pip install "romav2-plugin[ray]"``.
"""

from romav2_plugin.app.pairs import PairsRun
from romav2_plugin.distributed.cluster import DEFAULT_MAX_IN_FLIGHT, import_ray
from romav2_plugin.distributed.hloc import hloc_match_dense
from romav2_plugin.distributed.options import DEFAULT_BATCH_SIZE
from romav2_plugin.distributed.pairs import RayExecutor, match_pairs

__all__ = [
    "import_ray",
    "match_pairs",
    "hloc_match_dense",
    "PairsRun",
    "RayExecutor",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_IN_FLIGHT",
]
