"""The compiled extension refuses to load against a torch it was not built for, with a clear message."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import subprocess_env
from hotloop import _build_info
from hotloop._native import _C


def test_extension_reports_the_torch_it_was_built_against():
    assert _C.TORCH_VERSION == _build_info.TORCH_VERSION == torch.__version__


def test_mismatched_torch_raises_import_error_naming_both_versions():
    script = (
        "import torch; torch.__version__ = '0.0.1-other'\n"
        "try:\n"
        "    import hotloop\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    ).stdout
    assert f"built against torch {torch.__version__}" in out
    assert "0.0.1-other" in out
    assert "Rebuild hotloop" in out
