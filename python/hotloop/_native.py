"""Loads the compiled extension, refusing one built against a different torch with a clear message, and the
package version the build wrote (from pyproject.toml)."""

from __future__ import annotations

from typing import Any

import torch

_REBUILD_HINT = (
    "Rebuild hotloop against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps hotloop` from its source "
    "(or `make build` in a checkout)."
)


def _load() -> tuple[Any, str]:
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(
            "hotloop's compiled extension is missing (no hotloop/_build_info.py). " + _REBUILD_HINT
        ) from exc
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"hotloop._C was built against torch {_build_info.TORCH_VERSION}, but torch "
            f"{torch.__version__} is installed. " + _REBUILD_HINT
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(f"hotloop._C failed to load: {exc}. " + _REBUILD_HINT) from exc
    return _C, _build_info.VERSION


_C, VERSION = _load()
