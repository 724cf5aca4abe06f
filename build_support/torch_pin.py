"""Dynamic metadata for scikit-build-core: the wheel requires the torch release it was built against.

hotloop._C links libtorch's C++ ABI, which changes between torch releases, so a wheel built on torch 2.13
loads on torch 2.13.* and on nothing else. The build uses the torch installed in the build environment
(the one CMake compiles against), so that is the one pinned here.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, list[str]]:
    del project
    if set(settings) - {"field"}:
        raise ValueError(f"torch_pin takes no settings, got {sorted(set(settings) - {'field'})}")
    release = ".".join(importlib.metadata.version("torch").split("+")[0].split(".")[:2])
    return {"dependencies": [f"torch=={release}.*"]}
