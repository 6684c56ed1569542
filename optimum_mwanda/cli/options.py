"""Turn parsed command-line arguments into validated settings, before any model is loaded.

Everything here raises :class:`~optimum_mwanda.cli.errors.UsageError` with a message that names the flag or
file to fix. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..calibration.languages import normalize_language_tag
from ..configuration import PruningConfig, config_class_for_method, parse_mask_structure
from .arguments import DEFAULT_METHOD, DEMO
from .errors import UsageError

#: flag attribute -> PruningConfig field
CONFIG_FLAGS = {
    "sparsity": "sparsity",
    "mask_structure": "mask_structure",
    "layerwise": "layerwise",
    "ignore": "ignore",
    "samples_per_language": "samples_per_language",
    "seq_len": "calibration_seq_len",
    "batch_size": "batch_size",
    "seed": "seed",
}
_FLAG_NAMES = {field: "--" + flag.replace("_", "-") for flag, field in CONFIG_FLAGS.items()}
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_DEVICE_KEY = re.compile(r"^(\d+|cpu|disk|mps|cuda(:\d+)?|xpu(:\d+)?|npu(:\d+)?)$")


# ---------------------------------------------------------------------------------------------------------
# pruning config
# ---------------------------------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file holding a mapping of config fields."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {str(file)!r}: no such file")
    text = file.read_text(encoding="utf-8")
    suffix = file.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"--config {str(file)!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError("YAML configs need PyYAML: pip install pyyaml (or use a .json config)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"--config {str(file)!r} is not valid YAML: {err}") from None
    else:
        raise UsageError(f"--config {str(file)!r}: use a .json, .yaml or .yml file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {str(file)!r} must hold a mapping of PruningConfig fields (e.g. sparsity: 0.5), "
            f"not a {type(data).__name__}"
        )
    return data


def build_config(args: argparse.Namespace) -> PruningConfig:
    """The pruning config: ``--config`` file fields, overridden by the config flags that were given.

    With an ``N:M`` mask structure and no sparsity in the file or the flags, the sparsity is ``1 - N/M``.
    """
    data = load_config_file(args.config) if args.config else {}
    data.pop("optimum_mwanda_version", None)
    file_method = data.pop("method", None)
    overrides = {
        field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None
    }
    source = (
        " and ".join(
            part
            for part, used in (
                (f"--config {args.config!r}", args.config),
                ("the flags", overrides or args.method),
            )
            if used
        )
        or "the defaults"
    )
    try:
        config_class = config_class_for_method(args.method or file_method or DEFAULT_METHOD)
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    data.update(overrides)
    data.update(_method_options(args, config_class.method))
    structure = data.get("mask_structure")
    if isinstance(structure, str) and "sparsity" not in data:
        try:
            nm = parse_mask_structure(structure)
        except ValueError as err:
            raise UsageError(f"invalid pruning config from {source}: {err}") from None
        if nm is not None:
            data["sparsity"] = 1.0 - nm[0] / nm[1]
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        hint = ""
        if str(err).startswith("unknown") and args.config:
            hint = (
                f" (the file's fields must belong to {config_class.__name__}; "
                "remove them or pick the method they belong to)"
            )
        raise UsageError(f"invalid pruning config from {source}: {_flag_names(str(err))}{hint}") from None


def _method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method flags that were given (``--block-size`` ...), refused when ``method`` takes none such."""
    from ..methods.registry import entries, method_entry

    own = {option.field for option in method_entry(method).cli_options}
    given = {}
    for entry in entries():
        for option in entry.cli_options:
            value = getattr(args, f"method_{option.field}", None)
            if value is None or option.field in given:
                continue
            if option.field not in own:
                raise UsageError(f"{option.flag} does not apply to --method {method}")
            given[option.field] = value
    return given


def _flag_names(message: str) -> str:
    """Append the flag of every config field a message names, so a CLI user knows what to change."""
    named = [flag for field, flag in _FLAG_NAMES.items() if re.search(rf"\b{field}\b", message)]
    return message + (f" [flags: {', '.join(dict.fromkeys(named))}]" if named else "")


# ---------------------------------------------------------------------------------------------------------
# languages, paths, model
# ---------------------------------------------------------------------------------------------------------
def parse_languages(values: list[str] | None, flag: str = "--languages") -> list[str] | None:
    """Canonical language tags, duplicates removed (``None`` stays ``None``: "every language")."""
    if values is None:
        return None
    if not values:
        raise UsageError(f"{flag} is empty: name at least one language, e.g. {flag} en,de,sw")
    tags = []
    for value in values:
        try:
            tags.append(normalize_language_tag(value))
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
    return list(dict.fromkeys(tags))


def check_paths_exist(paths: list[str] | None, flag: str) -> list[Path] | None:
    """Every path of ``flag`` must exist."""
    if paths is None:
        return None
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"{flag}: no such file or folder: {', '.join(map(repr, missing))}")
    return [Path(p) for p in paths]


def check_languages_available(
    requested: list[str] | None, available: list[str], where: str, flag: str
) -> list[str]:
    """``requested`` (or all of ``available`` when ``None``), each of which must be available."""
    if requested is None:
        return list(available)
    unknown = [lang for lang in requested if lang not in available]
    if unknown:
        raise UsageError(
            f"{flag}: {where} has no text for {', '.join(map(repr, unknown))}; it has: {', '.join(available)}"
        )
    return list(requested)


@dataclass(frozen=True)
class ModelReference:
    """Where a model comes from: the embedded demo, a local folder or a Hub id."""

    name: str
    local_path: Path | None = None
    is_demo: bool = False


def resolve_model_reference(model: str | None, flag: str = "--model") -> ModelReference:
    """Check a model argument without loading anything: ``demo``/none, a saved folder, or a Hub id."""
    if model is None or model == DEMO:
        return ModelReference(DEMO, is_demo=True)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {model!r} is a file; give the model's folder (with config.json)")
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {model!r} has no config.json: it is not a saved transformers model")
        return ModelReference(str(path), local_path=path.absolute())
    from ..hub.identity import as_hub_id

    if as_hub_id(model) is None:
        raise UsageError(
            f"{flag} {model!r} is neither an existing folder nor a valid Hub model id (namespace/name)"
        )
    return ModelReference(model)


def parse_device_map(value: str | None) -> str | dict[str, Any] | None:
    """``--device-map``: a name (``auto``, ``cpu``, ``cuda:0``...) or a JSON object ``{module: device}``."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as err:
            raise UsageError(f"--device-map is not a valid JSON object: {err.msg}") from None
        if not isinstance(mapping, dict) or not mapping:
            raise UsageError("--device-map JSON must be a non-empty object {module name: device}")
        return mapping
    if not value:
        raise UsageError("--device-map is empty: use e.g. 'auto' or 'cpu'")
    return value


def parse_max_memory(value: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", "cpu": "64GiB"}``."""
    if value is None:
        return None
    result: dict[int | str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not _DEVICE_KEY.match(key) or not _MEMORY.match(size):
            raise UsageError(
                f"--max-memory entry {item!r} is malformed: use DEVICE=SIZE pairs such as '0=20GiB,cpu=64GiB'"
            )
        result[int(key) if key.isdigit() else key] = size.replace(" ", "")
    if not result:
        raise UsageError("--max-memory is empty: use DEVICE=SIZE pairs such as '0=20GiB,cpu=64GiB'")
    return result


def model_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of the model flags (dtype, placement, revision)."""
    device_map = parse_device_map(args.device_map)
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is not None and device_map is None:
        raise UsageError("--max-memory needs --device-map (e.g. --device-map auto)")
    if args.offload_folder is not None and device_map is None:
        raise UsageError("--offload-folder needs --device-map (e.g. --device-map auto)")
    kwargs: dict[str, Any] = {}
    if args.dtype != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, args.dtype)
    else:
        kwargs["dtype"] = "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if args.offload_folder is not None:
        folder = Path(args.offload_folder).expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--offload-folder {args.offload_folder!r} exists and is not a folder")
        check_creatable(folder, "--offload-folder")
        kwargs["offload_folder"] = str(folder)
    if args.revision is not None:
        kwargs["revision"] = args.revision
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


# ---------------------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------------------
def check_creatable(path: Path, flag: str) -> None:
    """``path`` exists and is writable, or its nearest existing ancestor is a writable folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(probe)!r} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r} is not writable (no write permission on {str(probe)!r})")


def check_checkpoint_dir(
    output_dir: str,
    model: ModelReference | None = None,
    offload_folder: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate ``--output-dir`` of ``prune``: new, empty or a checkpoint (or anything with ``--overwrite``),
    writable, not the source model's folder, not holding the offload folder."""
    from ..hub.atomic import check_replaceable
    from ..hub.card import PLOT_FILENAME
    from ..hub.serialization import CARD_FILENAME, REPORT_FILENAME

    try:
        path = check_replaceable(
            output_dir, overwrite, writes=[REPORT_FILENAME, CARD_FILENAME, PLOT_FILENAME]
        )
    except ValueError as err:
        message = str(err).replace("save_directory ", "").replace("overwrite=True", "--overwrite")
        raise UsageError(f"--output-dir: {message}") from None
    check_creatable(path, "--output-dir")
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {output_dir!r} is not writable")
    if model is not None and model.local_path is not None and model.local_path.resolve() == path.resolve():
        raise UsageError(
            f"--output-dir {output_dir!r} is the folder of the model being pruned; saving would replace the "
            "original: choose another folder"
        )
    if offload_folder is not None and Path(offload_folder).absolute().is_relative_to(path):
        raise UsageError("--offload-folder must not lie inside --output-dir, whose files the save swaps out")
    return path


def check_result_dir(output_dir: str, files: list[str]) -> Path:
    """Validate a folder that receives result files (created if missing; only ``files`` are replaced)."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {output_dir!r} exists and is not a folder")
    check_creatable(path, "--output-dir")
    clashes = [name for name in files if (path / name).is_dir()]
    if clashes:
        raise UsageError(
            f"--output-dir {output_dir!r} holds folders named {clashes}; remove them or choose another"
        )
    return path


# ---------------------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------------------
def parse_mixes(values: list[str] | None) -> dict[str, list[str]]:
    """``["all=en+de+sw"]`` -> ``{"all": ["en", "de", "sw"]}`` (``,`` also separates languages)."""
    mixes: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, langs = value.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--mix {value!r} is malformed: use NAME=LANG+LANG, e.g. --mix all=en+de+sw")
        if name in mixes:
            raise UsageError(f"--mix name {name!r} is given twice")
        items = [item for item in re.split(r"[+,]", langs) if item.strip()]
        if len(items) < 1:
            raise UsageError(f"--mix {value!r} names no language")
        mixes[name] = parse_languages(items, flag=f"--mix {name}") or []
    return mixes


def load_eval_results(path: str) -> dict[str, dict[str, float]]:
    """Read ``{"before": {lang: ppl}, "after": {lang: ppl}}`` (either half optional) from a JSON file."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--eval-results {path!r}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--eval-results {path!r} is not valid JSON (line {err.lineno}: {err.msg})"
        ) from None
    if not isinstance(data, dict) or not data or set(data) - {"before", "after"}:
        raise UsageError(
            f"--eval-results {path!r} must be an object with 'before' and/or 'after', each "
            '{language: perplexity}, e.g. {"after": {"en": 25.1}}'
        )
    for key, values in data.items():
        if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
        ):
            raise UsageError(f"--eval-results {path!r}: {key!r} must map languages to numbers")
    return data


def resolve_token(token: str | None) -> str:
    """The Hub token for ``--push-to-hub`` (:func:`optimum_mwanda.hub.push.resolve_token` decides), as a
    usage error when there is none."""
    from ..hub.push import HubAuthenticationError
    from ..hub.push import resolve_token as hub_resolve_token

    try:
        return hub_resolve_token(token)
    except HubAuthenticationError:
        raise UsageError(
            "--push-to-hub needs a Hub token with write access: pass --token, set HF_TOKEN or run "
            "`hf auth login`"
        ) from None
