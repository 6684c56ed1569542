"""Load a script of this repository (``benchmarks/``, ``examples/``, ``scripts/``) as a module.

The scripts are not packages, so the tests of their helpers import them from their file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """Execute ``REPO / relative_path`` as a fresh module called ``name`` (default: the file's stem).

    The module is registered in ``sys.modules`` before it runs: dataclasses look their module up by name.
    """
    path = REPO / relative_path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
