"""Loads the data files of the bundled lm-evaluation-harness tasks (``custom_dataset`` in their YAMLs).

lm-eval resolves a task's ``dataset_kwargs: {data_files: ...}`` against the working directory, not the YAML's
folder, so the bundled tasks name their files relative to ``data/`` and this function finds them inside the
installed package. The rows are read into in-memory ``datasets`` objects (``Dataset.from_list``), so
evaluating writes no Arrow cache and never contacts the Hub.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

DATA_DIR = Path(str(resources.files("optimum_mwanda.evaluation.tasks").joinpath("data")))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_local_dataset(data_files: dict[str, str] | None = None, **_metadata: Any):
    """``{split: file under data/}`` -> a ``datasets.DatasetDict`` of those files' rows.

    lm-eval calls this with the task's ``dataset_kwargs`` and ``metadata`` as keyword arguments; the
    metadata (task version, ...) is not needed here.
    """
    import datasets

    if not data_files:
        raise ValueError("a bundled task must name its data_files")
    splits = {}
    for split, relative in data_files.items():
        path = (DATA_DIR / relative).resolve()
        if DATA_DIR.resolve() not in path.parents:
            raise ValueError(f"data file {relative!r} lies outside the bundled task data")
        if not path.is_file():
            raise FileNotFoundError(
                f"bundled task data {path} is missing: rebuild with scripts/build_tasks.py"
            )
        splits[split] = datasets.Dataset.from_list(read_jsonl(path))
    return datasets.DatasetDict(splits)
