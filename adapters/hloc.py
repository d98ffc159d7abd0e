"""hloc adapter: RoMa v2 as a dense matcher of ``hloc.match_dense``.

After ``import romav2_plugin`` (with hloc installed)::

    from hloc import match_dense
    features, matches = match_dense.main(match_dense.confs["romav2"], pairs, images, export_dir=outputs)

What :func:`register` adds to hloc (nothing existing is changed):

* ``hloc.matchers.romav2``: a module holding one ``hloc.utils.base_model.BaseModel`` subclass, ``RoMaV2``,
  so that ``dynamic_load(hloc.matchers, "romav2")`` (and ``import hloc.matchers.romav2``) work;
* ``hloc.match_dense.confs``: ``romav2`` (``precise`` setting), ``romav2_fast`` (``base``) and
  ``romav2_aachen`` (``precise``, coarser quantisation for larger scenes), added with ``setdefault``.

Both are added lazily, by an import hook, the first time hloc imports them, so ``import romav2_plugin``
does not pay for importing hloc (pycolmap, OpenCV, ...). If hloc is already imported they are added at once.

Contract with hloc: ``match_dense`` passes ``image0``/``image1`` ``(1, C, H, W)`` in ``[0, 1]`` (resized by its
``preprocessing``) and expects ``keypoints0``/``keypoints1`` in pixels of those tensors with the pixel centre at
integers (it rescales them with ``(k + 0.5) * scale - 0.5``) and ``scores``. Here: keypoints from
:meth:`romav2_plugin.RoMaV2.sample` via :meth:`~romav2_plugin.RoMaV2.to_pixel_coordinates` with
``pixel_center=0.0`` (done by the kornia adapter's module, reused as is), scores = overlap.

Like hloc's LoFTR adapter ("we refine kpts in image0"), ``image1`` is given to the core as image A and
``image0`` as B: in one-direction settings ``image1``'s keypoints are grid points, the same in every pair,
and ``image0``'s are the refined ones (where the warp lands), which hloc keeps unquantised for a query.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

import torch

__all__ = [
    "MODULE_NAME",
    "DEFAULT_MODEL_CONF",
    "check_model_conf",
    "CONFS",
    "INSTALL_HINT",
    "register",
    "ensure_registered",
    "require_hloc",
    "matcher_class",
    "build_dense_matcher",
    "dense_predict",
]

MODULE_NAME = "hloc.matchers.romav2"
_CONFS_MODULE = "hloc.match_dense"

INSTALL_HINT = (
    "hloc is not installed. Install the extra and hloc itself (hloc is not on PyPI): "
    "pip install 'romav2-plugin[hloc]' "
    "'hloc @ git+https://github.com/cvg/Hierarchical-Localization'"
)

#: ``conf["model"]`` defaults of the ``romav2`` matcher (merged by hloc's ``BaseModel``); with ``name``, the
#: only keys accepted (:func:`check_model_conf`).
DEFAULT_MODEL_CONF: dict[str, Any] = {
    # None: official release ($ROMAV2_WEIGHTS, else the cached download); a path, a URL, or a name that
    # RoMaV2.from_pretrained knows ("tiny": the small model shipped with the package); passed through.
    "weights": None,
    "setting": "precise",  # RoMa v2 preset: turbo, fast, base, precise, mega1500, ...
    "amp": None,  # bf16 autocast; None: on for CUDA and CPUs with native bf16 (runtime.amp_default)
    "max_num_matches": 5000,  # matches per pair (balanced sampling) / top-k by overlap (threshold mode)
    "sample_mode": "balanced",  # "balanced" (KDE-balanced, official) or "threshold" (all grid matches)
    "confidence_threshold": 0.5,  # overlap threshold of "threshold" mode
    "min_overlap": None,  # balanced mode: draw only matches with overlap above it (None: always max_num_matches)
    "seed": 0,  # sampling seed (fresh generator per pair: reproducible, order-independent); None: global RNG
}


def _conf(output: str, setting: str, resize_max: int, max_error: float, cell_size: int, **model: Any) -> dict:
    return {
        "output": output,
        "model": {"name": "romav2", "weights": None, "setting": setting} | model,
        # RGB; the core resizes to its working resolution itself, so no divisibility is needed (dfactor 1:
        # no extra anisotropic resize) and resize_max only bounds the image read from disk.
        "preprocessing": {"grayscale": False, "resize_max": resize_max, "dfactor": 1},
        "max_error": max_error,  # max error for assigned keypoints (in px)
        "cell_size": cell_size,  # size of quantization patch (max 1 kp/patch)
    }


#: Our ``hloc.match_dense`` confs; quantisation mirrors hloc's ``loftr`` / ``loftr_aachen``.
CONFS: dict[str, dict] = {
    # Best quality (precise: 800 + 1280 px, both directions); loads of points, small scenes.
    "romav2": _conf("matches-romav2", "precise", 1280, 1, 1, max_num_matches=5000),
    # base setting (640 px, one direction): ~4x cheaper.
    "romav2_fast": _conf("matches-romav2_fast", "base", 1024, 1, 1, max_num_matches=5000),
    # Larger scenes: coarser cells merge matches of different pairs into tracks.
    "romav2_aachen": _conf("matches-romav2_aachen", "precise", 1280, 2, 8, max_num_matches=10000),
    # romav2-tiny, shipped with the package (256 px + a 384 px second pass, one direction): works offline; a demo model.
    "romav2_tiny": _conf("matches-romav2_tiny", "tiny", 1024, 1, 1, max_num_matches=5000, weights="tiny"),
}


def require_hloc() -> None:
    """Raise ``ImportError`` (with install instructions) unless hloc is importable."""
    if importlib.util.find_spec("hloc") is None:
        raise ImportError(INSTALL_HINT)


# --------------------------------------------------------------------------- maths-free glue
def _load_core(conf: dict[str, Any]) -> torch.nn.Module:
    """The core model for a ``conf["model"]`` (tests replace this to inject a network double)."""
    from romav2_plugin.model import RoMaV2

    return RoMaV2.from_pretrained(conf["weights"], setting=conf["setting"], amp=conf["amp"])


def check_model_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf["model"]`` merged with :data:`DEFAULT_MODEL_CONF`; ``ValueError`` naming unknown keys (typos)."""
    unknown = sorted(set(conf) - set(DEFAULT_MODEL_CONF) - {"name"})
    if unknown:
        valid = ", ".join(["name", *DEFAULT_MODEL_CONF])
        raise ValueError(
            f"unknown key(s) in the romav2 conf['model']: {', '.join(unknown)}; valid keys: {valid}"
        )
    return {**DEFAULT_MODEL_CONF, **conf}


def build_dense_matcher(conf: dict[str, Any], core: torch.nn.Module | None = None) -> torch.nn.Module:
    """The kornia-style dense matcher (``adapters.kornia.RoMaV2``) for a ``conf["model"]``.

    ``core``: an already-built core model (or test double); default: :func:`_load_core`.
    """
    from romav2_plugin.adapters.kornia import RoMaV2 as DenseMatcher

    conf = check_model_conf(conf)
    num = conf["max_num_matches"]
    if conf["sample_mode"] == "balanced" and (num is None or int(num) <= 0):
        raise ValueError(f"max_num_matches must be a positive int in balanced mode, got {num!r}")
    if core is None:
        core = _load_core(conf)
    elif conf.get("setting"):
        core.apply_setting(conf["setting"])
    return DenseMatcher(
        num_samples=int(num) if num is not None else 1,
        sample_mode=conf["sample_mode"],
        confidence_threshold=conf["confidence_threshold"],
        seed=conf["seed"],
        model=core,
        min_overlap=conf["min_overlap"],
    )


def dense_predict(net: torch.nn.Module, data: dict[str, torch.Tensor], max_num_matches: int | None) -> dict:
    """hloc's dense-matcher output for one pair: keypoints in pixels of the given tensors (centre at 0).

    ``image1`` is the core's image A (grid side in one-direction settings), ``image0`` its B (refined side),
    as in hloc's LoFTR adapter.

    Args:
        net: from :func:`build_dense_matcher`.
        data: ``image0``, ``image1``: ``(1, C, H, W)`` float in ``[0, 1]`` (hloc's preprocessed images).
        max_num_matches: keep the top-k matches by score (``None``: all).

    Returns:
        ``keypoints0 (N, 2)``, ``keypoints1 (N, 2)``, ``scores (N,)`` (overlap in ``[0, 1]``).
    """
    # torchvision's resize may overshoot [0, 1] by rounding; the core rejects out-of-range floats.
    pred = net({"image0": data["image1"].clamp(0, 1), "image1": data["image0"].clamp(0, 1)})  # swapped
    k0, k1, scores = pred["keypoints1"], pred["keypoints0"], pred["confidence"]
    if max_num_matches is not None and len(scores) > max_num_matches:
        keep = torch.argsort(scores, descending=True)[: int(max_num_matches)]
        k0, k1, scores = k0[keep], k1[keep], scores[keep]
    return {"keypoints0": k0, "keypoints1": k1, "scores": scores}


# --------------------------------------------------------------------------- hloc glue
_MATCHER_CLASS: type | None = None


def matcher_class() -> type:
    """The ``hloc.utils.base_model.BaseModel`` subclass (``__module__ == "hloc.matchers.romav2"``)."""
    global _MATCHER_CLASS
    if _MATCHER_CLASS is not None:
        return _MATCHER_CLASS
    require_hloc()
    from hloc.utils.base_model import BaseModel

    class RoMaV2(BaseModel):
        """RoMa v2 dense matcher for ``hloc.match_dense`` (conf keys: ``DEFAULT_MODEL_CONF``)."""

        default_conf = copy.deepcopy(DEFAULT_MODEL_CONF)
        required_inputs = ["image0", "image1"]

        def _init(self, conf):
            self.net = build_dense_matcher(conf)
            self.max_matches = conf["max_num_matches"]

        def _forward(self, data):
            return dense_predict(self.net, data, self.max_matches)

    RoMaV2.__module__ = MODULE_NAME  # hloc's dynamic_load keeps only classes of that exact module
    RoMaV2.__qualname__ = "RoMaV2"
    _MATCHER_CLASS = RoMaV2
    return RoMaV2


def _add_confs(match_dense_module) -> None:
    for name, conf in CONFS.items():
        match_dense_module.confs.setdefault(name, copy.deepcopy(conf))


class _MatcherModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module object

    def exec_module(self, module):
        cls = matcher_class()
        module.RoMaV2 = cls
        module.__doc__ = "RoMa v2 dense matcher, provided by romav2_plugin (romav2_plugin.adapters.hloc)."


class _AddConfsLoader(importlib.abc.Loader):
    """Wraps hloc.match_dense's own loader: run the module, then add our confs."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _add_confs(module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... (tracebacks, runpy)
        return getattr(self._loader, name)


class _HlocFinder(importlib.abc.MetaPathFinder):
    """Finds ``hloc.matchers.romav2`` (unless hloc ever ships its own) and hooks ``hloc.match_dense``."""

    def _find_elsewhere(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def find_spec(self, fullname, path, target=None):
        if fullname == MODULE_NAME:
            spec = self._find_elsewhere(fullname, path, target)
            if spec is not None:
                return spec  # upstream's own module wins
            return importlib.machinery.ModuleSpec(fullname, _MatcherModuleLoader(), origin=__file__)
        if fullname == _CONFS_MODULE:
            spec = self._find_elsewhere(fullname, path, target)
            if spec is not None and spec.loader is not None and not isinstance(spec.loader, _AddConfsLoader):
                spec.loader = _AddConfsLoader(spec.loader)
            return spec
        return None


def register() -> bool:
    """Make RoMa v2 available to hloc; idempotent; returns ``False`` (and does nothing) without hloc.

    Installs an import hook so that ``hloc.matchers.romav2`` exists and ``hloc.match_dense.confs`` gains
    our confs when hloc imports them; does it at once for whichever of them is already imported.
    """
    if importlib.util.find_spec("hloc") is None:
        return False
    if not any(isinstance(f, _HlocFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HlocFinder())
    if "hloc.matchers" in sys.modules and MODULE_NAME not in sys.modules:
        importlib.import_module(MODULE_NAME)
    if _CONFS_MODULE in sys.modules:
        _add_confs(sys.modules[_CONFS_MODULE])
    return True


def ensure_registered():
    """Import hloc, register, and return ``hloc.match_dense`` (``ImportError`` naming the extra without hloc)."""
    require_hloc()
    register()
    try:
        match_dense = importlib.import_module(_CONFS_MODULE)
        _add_confs(match_dense)  # no-op unless match_dense was imported through another path
        importlib.import_module(MODULE_NAME)
    except ImportError as e:  # hloc is there, what it imports is not (scipy, OpenCV, pycolmap, ...)
        raise ImportError(f'{e}: hloc\'s dense matching needs pip install "romav2-plugin[hloc]"') from e
    return match_dense
