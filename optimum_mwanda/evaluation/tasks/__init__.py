"""Offline multilingual lm-evaluation-harness tasks, shipped with the package (built by
``scripts/build_tasks.py``; sizes and sources in ``manifest.json``).

- ``mwanda_continuation_<lang>`` (group ``mwanda_continuation``): 4-way multiple-choice next sentence on the
  held-out part of the bundled corpus; ``acc`` and ``acc_norm``.
- ``mwanda_translation_en-<lang>`` / ``mwanda_translation_<lang>-en`` (groups ``mwanda_translation_en_xx``,
  ``mwanda_translation_xx_en``): 3-shot sentence translation on aligned handbook editions; ``chrf``.

``TASKS_DIR`` is the folder to give lm-eval: ``lm_eval --include_path $(python -c "from
optimum_mwanda.evaluation.tasks import TASKS_DIR; print(TASKS_DIR)") --tasks mwanda_continuation ...``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

TASKS_DIR = Path(str(resources.files("optimum_mwanda.evaluation.tasks")))

CONTINUATION = "mwanda_continuation"
TRANSLATION_EN_XX = "mwanda_translation_en_xx"
TRANSLATION_XX_EN = "mwanda_translation_xx_en"
GROUPS = (CONTINUATION, TRANSLATION_EN_XX, TRANSLATION_XX_EN)
# "mwanda_translation" names both directions (expanded by run_downstream, not an lm-eval group).
TRANSLATION = "mwanda_translation"


@lru_cache(maxsize=1)
def tasks_manifest() -> dict[str, Any]:
    """The builder's manifest: per language the number of items of each task, sources and licences."""
    return json.loads((TASKS_DIR / "manifest.json").read_text(encoding="utf-8"))


def task_languages(family: str) -> list[str]:
    """Languages that have a subtask of ``family`` (a group name above, or ``mwanda_translation``)."""
    sizes = tasks_manifest()["sizes"]
    key = "continuation" if family == CONTINUATION else "translation_test"
    if family not in (*GROUPS, TRANSLATION):
        raise ValueError(
            f"unknown bundled task family {family!r}; known: {', '.join((*GROUPS, TRANSLATION))}"
        )
    return sorted(lang for lang, size in sizes.items() if size[key] > 0)


def subtask_names(family: str, languages: list[str] | None = None) -> list[str]:
    """The subtasks of ``family`` for ``languages`` (default: all that have one), in language order."""
    available = task_languages(family)
    chosen = available if languages is None else [lang for lang in languages if lang in available]
    if family == CONTINUATION:
        return [f"{CONTINUATION}_{lang}" for lang in chosen]
    names = []
    for lang in chosen:
        if family in (TRANSLATION, TRANSLATION_EN_XX):
            names.append(f"mwanda_translation_en-{lang}")
        if family in (TRANSLATION, TRANSLATION_XX_EN):
            names.append(f"mwanda_translation_{lang}-en")
    return names


__all__ = [
    "CONTINUATION",
    "GROUPS",
    "TASKS_DIR",
    "TRANSLATION",
    "TRANSLATION_EN_XX",
    "TRANSLATION_XX_EN",
    "subtask_names",
    "task_languages",
    "tasks_manifest",
]
