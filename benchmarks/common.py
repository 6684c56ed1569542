"""Helpers several benchmark scripts share (standard library only, so any script can import it).

The scripts run as ``python benchmarks/<name>.py``, which puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def load_average() -> float:
    """The one-minute load average, recorded next to timings because the machine is shared."""
    return os.getloadavg()[0]


def write_record(output: str | Path, record: Mapping[str, Any], markdown: str) -> None:
    """Write ``record`` to ``<output>.json`` and ``markdown`` to ``<output>.md``, then print the markdown."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(record, indent=2))
    Path(f"{output}.md").write_text(markdown)
    print(markdown)
