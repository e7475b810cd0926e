"""Keep this repository's ``kernels/`` folder from standing in for Hugging Face's ``kernels`` package.

The Triton kernels live in a top-level ``kernels/`` folder of the repository, installed as
``blocksparse_moe.kernels``. Run from a checkout's root (``python -m pytest``,
``python -m benchmarks...``), the root is on ``sys.path``, so ``import kernels`` finds that
folder. transformers >= 5.25 imports the Hub's ``kernels`` distribution (when installed)
from ``transformers.integrations.moe``; given our folder it fails on a missing name
(``CUDAProperties``), and the transformers integration could not be imported at all.

:func:`unshadow_hub_kernels`, called before transformers is imported, loads the installed
distribution from the rest of ``sys.path`` into ``sys.modules["kernels"]`` when (and only
when) ``import kernels`` would resolve to our folder. Nothing changes anywhere else: an
installed wheel has no top-level ``kernels`` folder, and without the distribution
transformers does not import ``kernels`` at all.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["unshadow_hub_kernels"]


def _our_kernels_dir() -> str | None:
    spec = importlib.util.find_spec("blocksparse_moe.kernels")
    return os.path.dirname(os.path.realpath(spec.origin)) if spec is not None and spec.origin else None


def unshadow_hub_kernels() -> None:
    """Put the installed ``kernels`` distribution in ``sys.modules`` if ``import kernels`` would find our folder.

    Also when our folder was imported under that name already (an earlier ``import
    transformers...`` that then failed, as a process's preload does): it is dropped first.
    """
    ours = _our_kernels_dir()
    if ours is None:
        return
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin is None or os.path.dirname(os.path.realpath(origin)) != ours:
            return  # the real one (or something else) is loaded: leave it
        del sys.modules["kernels"]  # our folder under the Hub's name
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        return
    if os.path.dirname(os.path.realpath(spec.origin)) != ours:
        return  # the name already resolves elsewhere: nothing is shadowed
    root = os.path.dirname(ours)
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    real = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if real is None or real.loader is None:
        return  # the distribution is not installed; transformers then does not import it
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
