"""lm-evaluation-harness's own tasks on local data: the dataset of each task redirected to local files.

lm-eval's task YAMLs name a Hub dataset (``dataset_path: cambridgeltl/xcopa``, ``dataset_name: et``), which
an air-gapped machine cannot download. :func:`plan_task_data` finds, for every leaf task of the requested
tasks and groups, local files for the splits lm-eval reads (JSON lines, JSON, Parquet, CSV, or a folder
written by ``datasets``' ``save_to_disk``); :func:`write_overrides` then writes, per task, a YAML that
``include:``s lm-eval's own YAML of that task and changes only where the data comes from
(``dataset_path`` becomes the local builder, ``json``/``parquet``/``csv``/``arrow``, with ``data_files``;
``dataset_name``, ``custom_dataset`` and the split names the local data lacks are cleared). Prompts,
``process_docs``, choices, targets, filters, metrics and group aggregation stay lm-eval's: the YAMLs of the
groups are re-registered the same way (an ``include:`` of lm-eval's group YAML), so a group aggregates the
redirected tasks exactly as it would the Hub ones. The folder of override YAMLs is then lm-eval's
``include_path`` (task names are unchanged).

Which split is evaluated: lm-eval scores the test split when the task has one, otherwise validation. A local
copy often holds only the validation split (XCOPA's public test labels are a separate download): then the
task is evaluated on validation, ``test_split`` is cleared, and :attr:`LocalTask.note` says so (recorded in
``DownstreamResult.settings["task_data"]``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_file

#: Local file formats: suffix -> the ``datasets`` builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Other names a split's file may have (XCOPA ships ``val.<lang>.jsonl``).
SPLIT_ALIASES = {
    "validation": ("validation", "val", "dev"),
    "val": ("val", "validation", "dev"),
    "dev": ("dev", "validation", "val"),
    "train": ("train", "training"),
    "eval": ("eval", "validation", "val", "dev"),  # XStoryCloze names its validation split "eval"
}
_SPLIT_FIELDS = ("test_split", "validation_split", "training_split", "fewshot_split")


class MissingTaskData(FileNotFoundError):
    """A task's data is not in the local folders (the message names the files looked for)."""


class UnsupportedTask(ValueError):
    """A task whose data cannot be redirected by configuration (a Python task class, an inline group
    member that sets its own dataset)."""


@dataclasses.dataclass(frozen=True)
class LocalTask:
    """One lm-eval task redirected to local files.

    Attributes:
        name: lm-eval's task name (``xcopa_et``).
        source_yaml: lm-eval's YAML of the task (the override ``include:``s it).
        hub_dataset: what lm-eval would have downloaded (``cambridgeltl/xcopa`` subset ``et``).
        builder: the ``datasets`` builder of the local files (``json``, ``parquet``, ``csv``, ``arrow``).
        files: ``{split name as the task names it: [local files]}``.
        overrides: the task-config keys changed (``dataset_path``, ``dataset_kwargs``, split fields...).
        evaluated_split: the split lm-eval will score.
        note: set when the evaluated split differs from the one lm-eval would score on the Hub data.
    """

    name: str
    source_yaml: str
    hub_dataset: str
    builder: str
    files: dict[str, list[str]]
    overrides: dict[str, Any]
    evaluated_split: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hub_dataset": self.hub_dataset,
            "builder": self.builder,
            "files": self.files,
            "evaluated_split": self.evaluated_split,
            **({"note": self.note} if self.note else {}),
        }


@dataclasses.dataclass(frozen=True)
class TaskDataPlan:
    """Every requested lm-eval task and group resolved to local data (see :func:`plan_task_data`).

    Attributes:
        tasks: ``{task: LocalTask}``, the leaf tasks.
        groups: ``{group: lm-eval's YAML of the group}``, re-registered over the redirected tasks.
        roots: the folders searched.
    """

    tasks: dict[str, LocalTask]
    groups: dict[str, str]
    roots: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "roots": list(self.roots),
            "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
            "groups": sorted(self.groups),
        }


# ---------------------------------------------------------------------------------------------------------
# finding the files of one split
# ---------------------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


def _templates(root: Path, task: str, dataset_path: str | None, subset: str | None) -> list[str]:
    """Path templates (``{S}``: the split) where a split's data may lie under ``root``, most specific first."""
    bases = [root / _safe(dataset_path.rstrip("/").split("/")[-1])] if dataset_path else []
    bases.append(root)
    templates = [str(root / _safe(task) / "{S}")]
    for base in bases:
        if subset:
            n = _safe(subset)
            templates += [str(base / n / "{S}"), str(base / f"{n}.{{S}}"), str(base / f"{{S}}.{n}")]
        else:
            templates.append(str(base / "{S}"))
    return list(dict.fromkeys(templates))


def candidate_locations(
    root: Path, task: str, dataset_path: str | None, subset: str | None, split: str
) -> list[Path]:
    """Where a split's data may lie under ``root``, most specific first (paths without a suffix; each is
    tried with every suffix of :data:`FORMATS`, and as a ``save_to_disk`` folder).

    With ``S`` the split or one of its aliases, ``N`` the dataset's subset (``dataset_name``), ``T`` the task
    name and ``B`` the last part of the Hub dataset name: ``T/S``, ``B/N/S``, ``B/N.S``, ``B/S.N``,
    ``N/S``, ``N.S``, ``S.N`` (and, for a task with no subset, ``B/S`` and ``S``).
    """
    names = SPLIT_ALIASES.get(split, (split,))
    found = [Path(t.replace("{S}", s)) for t in _templates(root, task, dataset_path, subset) for s in names]
    return list(dict.fromkeys(found))


def _existing(location: Path) -> list[tuple[str, list[Path]]]:
    """``[(builder, files)]`` of the data at ``location`` (a suffix-less path): a file with a known suffix,
    or a ``save_to_disk`` folder (``state.json`` and ``*.arrow`` files)."""
    hits = []
    for suffix, builder in FORMATS.items():
        path = location.with_name(location.name + suffix)
        if path.is_file():
            hits.append((builder, [path]))
    if location.is_dir() and (location / "state.json").is_file():
        arrows = sorted(location.glob("*.arrow"))
        if arrows:
            hits.append(("arrow", arrows))
    return hits


def find_split(
    roots: Sequence[Path], task: str, dataset_path: str | None, subset: str | None, split: str
) -> tuple[str, list[Path]] | None:
    """The one local copy of ``split`` of ``task`` under ``roots`` as ``(builder, files)``, or ``None``.

    Raises:
        ValueError: two different copies match (say which one to use by removing or moving the other).
    """
    hits: dict[tuple[Path, ...], str] = {}
    for root in roots:
        for location in candidate_locations(root, task, dataset_path, subset, split):
            for builder, files in _existing(location):
                hits.setdefault(tuple(p.resolve() for p in files), builder)
    if len(hits) > 1:
        listed = "; ".join(", ".join(map(str, files)) for files in hits)
        raise ValueError(f"{task}: several local copies of split {split!r} match: {listed}")
    if not hits:
        return None
    files, builder = next(iter(hits.items()))
    return builder, list(files)


def _expected(roots: Sequence[Path], task: str, dataset_path, subset, splits: Iterable[str]) -> str:
    """The places looked for, one line per pattern: ``DIR/xcopa/et/{test}.{jsonl,json,parquet,csv}``."""
    names = [name for split in splits for name in SPLIT_ALIASES.get(split, (split,))]
    alternatives = "{" + ",".join(dict.fromkeys(names)) + "}"
    suffixes = "{" + ",".join(s.lstrip(".") for s in FORMATS) + "}"
    lines = [
        t.replace("{S}", alternatives) + f".{suffixes} (or a save_to_disk folder)"
        for root in roots
        for t in _templates(root, task, dataset_path, subset)
    ]
    return "\n    ".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the plan: leaf tasks, groups and the files of each split
# ---------------------------------------------------------------------------------------------------------
def _kind(entry) -> str:
    return getattr(entry.kind, "name", str(entry.kind))


def _collect(
    name: str, index: Mapping[str, Any], tasks: dict[str, Any], groups: dict[str, Any], trail: tuple = ()
) -> None:
    """Leaf tasks and groups under ``name`` (a task, group or tag of lm-eval's index), in order."""
    if name in trail:
        raise ValueError(f"lm-eval group cycle: {' -> '.join((*trail, name))}")
    entry = index.get(name)
    if entry is None:
        raise ValueError(f"lm-eval knows no task {name!r}")
    kind = _kind(entry)
    if kind == "PY_TASK":
        raise UnsupportedTask(
            f"{name} is a Python task class in lm-eval; its data cannot be redirected by configuration"
        )
    if kind == "TASK":
        tasks.setdefault(name, entry)
        return
    if kind == "TAG":
        for member in sorted(entry.tags):
            _collect(member, index, tasks, groups, (*trail, name))
        return
    groups.setdefault(name, entry)
    members = (entry.cfg or {}).get("task") or []
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, str):
            _collect(member, index, tasks, groups, (*trail, name))
            continue
        key = member.get("task", member.get("group")) if isinstance(member, dict) else None
        dataset_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset"} & set(
            member or {}
        )
        if not isinstance(key, str) or key not in index or dataset_keys:
            raise UnsupportedTask(
                f"group {name} defines member {member!r} inline (with its own dataset settings); "
                "run its tasks by name instead"
            )
        _collect(key, index, tasks, groups, (*trail, name))


def _splits(cfg: Mapping[str, Any]) -> dict[str, str | None]:
    fewshot = cfg.get("fewshot_split")
    if fewshot is None and isinstance(cfg.get("fewshot_config"), Mapping):
        fewshot = cfg["fewshot_config"].get("split")
    return {
        "test_split": cfg.get("test_split"),
        "validation_split": cfg.get("validation_split"),
        "training_split": cfg.get("training_split"),
        "fewshot_split": fewshot,
    }


def _plan_task(name: str, entry, roots: Sequence[Path], num_fewshot: int | None) -> LocalTask:
    cfg = dict(entry.cfg or {})
    dataset_path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    hub = f"{dataset_path}" + (f" (subset {subset})" if subset else "")
    splits = _splits(cfg)
    found: dict[str, tuple[str, list[Path]]] = {}
    for split in {s for s in splits.values() if s}:
        hit = find_split(roots, name, dataset_path, subset, split)
        if hit is not None:
            found[split] = hit

    test, validation = splits["test_split"], splits["validation_split"]
    note = None
    if test and test in found:
        evaluated = test
    elif validation and validation in found:
        evaluated = validation
        if test:
            note = (
                f"lm-eval scores the {test!r} split of {hub}; the local data has only {validation!r}, "
                f"which is evaluated instead"
            )
    else:
        wanted = [s for s in (test, validation) if s]
        raise MissingTaskData(
            f"{name}: no local data for its evaluation split ({' or '.join(map(repr, wanted)) or 'none named'}) "
            f"of {hub}; looked for\n    " + _expected(roots, name, dataset_path, subset, wanted)
        )

    used = {evaluated}
    shots = num_fewshot if num_fewshot is not None else int(cfg.get("num_fewshot") or 0)
    if shots > 0:
        # lm-eval draws demonstrations from fewshot_split, else training, else validation, else test.
        source = next(
            (s for s in (splits["fewshot_split"], splits["training_split"], validation) if s), evaluated
        )
        if source not in found:
            raise MissingTaskData(
                f"{name}: {shots}-shot evaluation draws demonstrations from split {source!r} of {hub}, "
                "which is not in the local data; looked for\n    "
                + _expected(roots, name, dataset_path, subset, [source])
            )
        if source == evaluated and source not in (splits["fewshot_split"], test):
            extra = f"demonstrations are drawn from the evaluated split {evaluated!r}"
            note = f"{note}; {extra}" if note else extra
        used.add(source)
    # Only the splits the run reads are loaded; the task's other split fields are cleared.
    found = {split: hit for split, hit in found.items() if split in used}

    builders = {builder for builder, _ in found.values()}
    if len(builders) > 1:
        raise ValueError(f"{name}: the local splits mix formats ({', '.join(sorted(builders))}); use one")
    builder = builders.pop()
    overrides: dict[str, Any] = {
        "task": name,
        "dataset_path": builder,
        "dataset_name": None,
        "custom_dataset": None,
        "dataset_kwargs": {
            "data_files": {s: [str(p) for p in files] for s, (_, files) in sorted(found.items())}
        },
    }
    for field, split in splits.items():
        if split and split not in found:
            overrides[field] = None
    if (
        splits["fewshot_split"]
        and splits["fewshot_split"] not in found
        and isinstance(cfg.get("fewshot_config"), Mapping)
    ):
        overrides["fewshot_config"] = {**cfg["fewshot_config"], "split": None}
    return LocalTask(
        name=name,
        source_yaml=str(entry.yaml_path),
        hub_dataset=hub,
        builder=builder,
        files={s: [str(p) for p in files] for s, (_, files) in sorted(found.items())},
        overrides=overrides,
        evaluated_split=evaluated,
        note=note,
    )


def plan_task_data(
    names: Sequence[str],
    task_data: str | Path | Sequence[str | Path],
    index: Mapping[str, Any],
    *,
    num_fewshot: int | None = None,
    skip: Iterable[str] = (),
) -> TaskDataPlan:
    """Resolve lm-eval tasks/groups/tags ``names`` to local files under ``task_data``.

    Args:
        names: lm-eval task, group or tag names.
        task_data: one folder or several, searched in order (see :func:`candidate_locations`).
        index: lm-eval's task index (``TaskManager(...).task_index``).
        num_fewshot: the few-shot count the run will use (``None``: each task's own), to require the
            demonstration split only when it is used.
        skip: names that already read local data (the bundled tasks); left as they are.

    Raises:
        MissingTaskData: a task's evaluation (or demonstration) split is not found; the message lists the
            paths looked for.
        UnsupportedTask: a Python task class, or an inline group member with its own dataset.
        ValueError: an unknown name, a folder that does not exist, two copies of one split, mixed formats.
    """
    folders = [task_data] if isinstance(task_data, (str, Path)) else list(task_data)
    roots = tuple(Path(f).expanduser().resolve() for f in folders)
    if not roots:
        raise ValueError("task_data names no folder")
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"task data folder {root} does not exist")
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    skipped = set(skip)
    for name in names:
        if name not in skipped:
            _collect(name, index, tasks, groups)
    planned: dict[str, LocalTask] = {}
    missing: list[str] = []
    for name, entry in tasks.items():
        try:
            planned[name] = _plan_task(name, entry, roots, num_fewshot)
        except MissingTaskData as err:
            missing.append(str(err))
    if missing:
        head = f"no local data for {len(missing)} of {len(tasks)} lm-eval task(s) under {', '.join(map(str, roots))}"
        shown = missing if len(missing) <= 3 else [*missing[:3], "... (the other tasks alike)"]
        raise MissingTaskData(head + ":\n  " + "\n  ".join(shown))
    return TaskDataPlan(planned, {g: str(e.yaml_path) for g, e in groups.items()}, tuple(map(str, roots)))


def write_overrides(plan: TaskDataPlan, folder: Path) -> Path:
    """Write the override YAMLs of ``plan`` into ``folder`` (an empty temporary folder the caller owns);
    returns ``folder``, to be given to lm-eval's ``TaskManager(include_path=...)``."""
    import yaml

    # Scratch files lm-eval reads once in this process: atomic, but no need to survive a power loss.
    folder.mkdir(parents=True, exist_ok=True)
    for task in plan.tasks.values():
        config = {"include": task.source_yaml, **task.overrides}
        write_file(
            folder / f"task_{_safe(task.name)}.yaml", yaml.safe_dump(config, sort_keys=False), durable=False
        )
    for group, source in plan.groups.items():
        # The group as lm-eval defines it (members, aggregation); its members resolve to the tasks above.
        config = {"include": source, "group": group}
        write_file(
            folder / f"group_{_safe(group)}.yaml", yaml.safe_dump(config, sort_keys=False), durable=False
        )
    return folder


class _DropOverrideWarnings(logging.Filter):
    """lm-eval warns once per task that an include path overrides its own task: that is the point here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "overrides existing task" not in record.getMessage()


def local_task_manager(plan: TaskDataPlan, folder: Path, include_path: Sequence[str] = ()):
    """An lm-eval ``TaskManager`` over the override YAMLs of ``plan`` (written into ``folder``) and
    ``include_path`` (e.g. the bundled tasks), without lm-eval's own index (every task it needs is
    re-registered)."""
    from lm_eval.tasks import TaskManager

    write_overrides(plan, folder)
    logger = logging.getLogger("lm_eval.tasks._index")
    quiet = _DropOverrideWarnings()
    logger.addFilter(quiet)
    try:
        return TaskManager(include_path=[*include_path, str(folder)], include_defaults=False)
    finally:
        logger.removeFilter(quiet)
