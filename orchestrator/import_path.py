"""Code a workload names by import path, 'package.module:function' (model.build, train.step).

A path resolves against the installed packages first, then the directory orch runs from: the
project root, where `orch run` is started and what `orch submit` uploads as the job's working
directory. So a module kept beside the workloads, `workloads/gan/dcgan.py`, is named
`workloads.gan.dcgan:build` without installing anything, as `python -m` would find it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["ImportPathError", "import_function"]


class ImportPathError(Exception):
    """An import path whose module or function cannot be found; the message names the field."""


def import_function(path: str, field: str) -> Callable[..., Any]:
    """Import 'package.module:function' named by the spec field `field` (e.g. 'train.step')."""
    module_name, _, attr = path.partition(":")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)  # last: a module of the project never shadows an installed one
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportPathError(
            f"{field}: cannot import module {module_name!r}: {exc} (modules resolve against "
            f"the installed packages and the directory orch runs from, {here})"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ImportPathError(f"{field}: module {module_name!r} has no function {attr!r}")
    return function
