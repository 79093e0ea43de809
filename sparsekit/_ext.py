"""Loads the compiled extension sparsekit._C behind a guard.

A missing extension, or one built against another torch, must not break the library: the
plain-torch reference ops (sparsekit.reference) take over, and the user is told once how to
rebuild. `EXTENSION` is the loaded module or None; `LOAD_ERROR` says why it is None.
"""

from __future__ import annotations

import os
import warnings

import torch

REBUILD_HINT = (
    "rebuild it against the installed torch with "
    "`pip install --no-build-isolation --no-deps -e .` in the sparsekit checkout "
    "(or `make build`)"
)

EXTENSION = None
LOAD_ERROR: str | None = None


def _runtime_torch_version() -> str:
    return torch.__version__.split("+")[0]


def _load():
    global EXTENSION, LOAD_ERROR
    if os.environ.get("SPARSEKIT_DISABLE_EXTENSION", "") == "1":
        LOAD_ERROR = "disabled by SPARSEKIT_DISABLE_EXTENSION=1"
        return
    try:
        from . import _build_config
    except ImportError:
        _build_config = None
    if _build_config is not None and _build_config.TORCH_VERSION != _runtime_torch_version():
        LOAD_ERROR = (
            f"sparsekit._C was built for torch {_build_config.TORCH_VERSION}, "
            f"but torch {_runtime_torch_version()} is installed; {REBUILD_HINT}"
        )
        return
    try:
        from . import _C
    except ImportError as exc:  # missing file, or symbols of another torch
        LOAD_ERROR = f"sparsekit._C could not be loaded ({exc}); {REBUILD_HINT}"
        return
    built_for = _C.build_info()["torch_version"]
    if built_for != _runtime_torch_version():
        LOAD_ERROR = (
            f"sparsekit._C was built for torch {built_for}, but torch "
            f"{_runtime_torch_version()} is installed; {REBUILD_HINT}"
        )
        return
    EXTENSION = _C


_load()
if EXTENSION is None and os.environ.get("SPARSEKIT_DISABLE_EXTENSION", "") != "1":
    warnings.warn(
        f"{LOAD_ERROR}. Falling back to the plain-torch reference ops (correct, not fast).",
        RuntimeWarning,
        stacklevel=2,
    )
