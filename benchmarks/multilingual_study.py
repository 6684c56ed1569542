"""Per-language held-out perplexity of Gemma 3 270M pruned by Wanda, SparseGPT and M-Wanda.

Every configuration prunes the *same* dense model (reloaded from an in-memory copy of its state dict) with
the same calibration budget (by default 7 languages x 8 sequences x 512 tokens from the bundled corpus) and
is scored on the same held-out windows of the bundled corpus: the 7 calibration languages (the headline is
their geometric mean) plus a few languages absent from calibration, to check that a result carries over.

Configurations are named ``BASE[option=value,...]@SPARSITY_PERCENT``:

- ``dense``; ``wanda``, ``sparsegpt``, ``mwanda`` (their configs' defaults);
- ``wanda-en``: Wanda calibrated on English only, with the same total number of sequences;
- aliases for the M-Wanda ablations, each switching one component against its default:
  ``mwanda-no-variance`` / ``mwanda-variance`` (``variance_weight=0`` / ``1``),
  ``mwanda-no-actprob`` (``activation_probability_weight=0``), the layer schedule switched against
  its default (``mwanda-uniform`` when the default is non-uniform, else ``mwanda-cwl``),
  ``mwanda-no-compensation`` and ``mwanda-pooled-compensation`` (``mean_compensation="none"`` /
  ``"pooled"``: no update of the kept weights / the all-language mean only);
- any config field in brackets, e.g. ``mwanda[variance_weight=0.5]@50``, ``wanda[layerwise=owl]@50``.

``--configs`` takes such names, bare names (expanded over ``--sparsities``) and the groups ``main``,
``ablations`` and ``explore``. Finished configurations are cached in the JSON output: a rerun with the same
settings skips them, so an interrupted study resumes where it stopped.

Usage (the committed results came from exactly the command recorded in the markdown output)::

    nice -n 5 python benchmarks/multilingual_study.py                       # main + ablations
    nice -n 5 python benchmarks/multilingual_study.py --configs explore     # the 50% exploration
    python benchmarks/multilingual_study.py --report-only                   # rewrite md/png from the JSON

Writes ``benchmarks/results/multilingual_study.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optimum_mwanda.evaluation.summary import geometric_mean
from optimum_mwanda.files import write_file

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUTPUT = RESULTS / "multilingual_study"
CALIBRATION_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
EXTRA_EVAL_LANGUAGES = ["fr", "it", "tr", "vi"]
METHODS = ("dense", "wanda", "sparsegpt", "mwanda")
MAIN_BASES = ("wanda", "sparsegpt", "mwanda")
_NAME = re.compile(
    r"^(?P<base>[a-z][a-z0-9-]*)(?:\[(?P<options>[^\]]*)\])?(?:@(?P<sparsity>\d+(?:\.\d+)?))?$"
)

# The 50% exploration, in order of priority: one factor at a time around the M-Wanda defaults, both
# weights small together, and Wanda with OWL (the layer schedule M-Wanda's CWL competes with).
EXPLORE_50 = [
    "mwanda[activation_threshold=2]@50",
    "mwanda[variance_weight=0.5]@50",
    "mwanda[activation_probability_weight=0.25]@50",
    "mwanda[layerwise=cwl,cwl_protect=shared]@50",
    "wanda[layerwise=owl]@50",
    "mwanda[activation_probability_weight=0.25,variance_weight=0.25]@50",
    "mwanda[variance_weight=2]@50",
    "mwanda[layerwise=owl]@50",
]


# ---------------------------------------------------------------------------------------------------------
# configuration names
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One row of the study: a pruning method with options, a sparsity and a calibration choice."""

    method: str
    sparsity: float = 0.0
    options: tuple[tuple[str, Any], ...] = ()
    english_only: bool = False

    @property
    def name(self) -> str:
        """The canonical name (options sorted), also the cache key."""
        if self.method == "dense":
            return "dense"
        base = "wanda-en" if self.english_only else self.method
        options = ",".join(f"{k}={_format_value(v)}" for k, v in self.options)
        return f"{base}{f'[{options}]' if options else ''}@{_format_percent(self.sparsity)}"

    def pruning_config(self, **common: Any):
        """The package config object (validated on construction), or ``None`` for the dense model."""
        if self.method == "dense":
            return None
        from optimum_mwanda.configuration import config_class_for_method

        return config_class_for_method(self.method)(sparsity=self.sparsity, **common, **dict(self.options))


def _format_percent(sparsity: float) -> str:
    percent = round(sparsity * 100, 6)
    return f"{percent:g}"


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_value(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def mwanda_layerwise_ablation() -> str:
    """The alias of the ablation that switches M-Wanda's layer schedule against its default."""
    from optimum_mwanda import MWandaConfig

    return "mwanda-uniform" if MWandaConfig().layerwise != "uniform" else "mwanda-cwl"


def mwanda_variance_ablation() -> str:
    """The alias of the ablation that switches M-Wanda's variance term against its default."""
    from optimum_mwanda import MWandaConfig

    return "mwanda-no-variance" if MWandaConfig().variance_weight else "mwanda-variance"


ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mwanda-no-variance": ("mwanda", {"variance_weight": 0.0}),
    "mwanda-variance": ("mwanda", {"variance_weight": 1.0}),
    "mwanda-no-actprob": ("mwanda", {"activation_probability_weight": 0.0}),
    "mwanda-uniform": ("mwanda", {"layerwise": "uniform"}),
    "mwanda-cwl": ("mwanda", {"layerwise": "cwl"}),
    "mwanda-no-compensation": ("mwanda", {"mean_compensation": "none"}),
    "mwanda-pooled-compensation": ("mwanda", {"mean_compensation": "pooled"}),
}


def parse_config_name(name: str) -> StudyConfig:
    """Parse ``BASE[opt=value,...]@PERCENT`` into a :class:`StudyConfig` (checked by building its config).

    Raises ``ValueError`` for an unknown base, a malformed option list, a missing sparsity or a config
    field the method does not have.
    """
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(f"malformed configuration name {name!r}: use BASE[option=value,...]@PERCENT")
    base = match.group("base")
    options: dict[str, Any] = {}
    english_only = False
    if base in ALIASES:
        base, preset = ALIASES[base]
        options.update(preset)
    elif base == "wanda-en":
        base, english_only = "wanda", True
    elif base not in METHODS:
        raise ValueError(
            f"unknown configuration base {base!r} in {name!r}; known: "
            f"{', '.join([*METHODS, 'wanda-en', *ALIASES])}"
        )
    if match.group("options"):
        for item in match.group("options").split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"malformed option {item!r} in {name!r}: use key=value")
            options[key.strip()] = _parse_value(value)
    if base == "dense":
        if options or match.group("sparsity"):
            raise ValueError(f"'dense' takes no options or sparsity, got {name!r}")
        return StudyConfig("dense")
    if match.group("sparsity") is None:
        raise ValueError(f"{name!r} names no sparsity: append @PERCENT, e.g. {base}@50")
    sparsity = float(match.group("sparsity")) / 100.0
    config = StudyConfig(base, sparsity, tuple(sorted(options.items())), english_only)
    try:
        built = config.pruning_config()
    except TypeError as err:
        raise ValueError(f"{name!r}: {err}") from err
    # Options equal to the method's defaults are dropped, so one configuration has one name (and cache key).
    kept = non_default_options(type(built), sparsity, dict(config.options))
    return dataclasses.replace(config, options=kept)


_FLAT_UPDATE = (
    "compensation_rank",
    "hessian_token_stride",
    "diagonal_dampening",
    "nm_selection",
    "refinement_steps",
)


def flat_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict in the flat form the study's names use: M-Wanda's ``weight_update`` as
    ``"closed_form"``/``"sweep"`` with its settings as separate fields (as records before 0.2 stored them)."""
    if data.get("method") != "mwanda" or isinstance(data.get("weight_update"), str):
        return dict(data)
    import warnings

    from optimum_mwanda.configuration import MWandaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        built = MWandaConfig.from_dict(dict(data))
        flat = {
            **data,
            "weight_update": "sweep" if built.resolve().weight_update.name == "sweep" else "closed_form",
        }
        flat.update({name: getattr(built, name) for name in _FLAT_UPDATE})
    return flat


def non_default_options(
    cls: type, sparsity: float, options: Mapping[str, Any]
) -> tuple[tuple[str, Any], ...]:
    """The fewest of ``options`` (sorted) from which ``cls`` resolves to all of them.

    Some defaults depend on other fields (``layerwise=None`` resolves to "uniform" under an N:M structure,
    ``compensation_rank=None`` to 0 without a compensation, ``weight_update=None`` to "closed_form" when a
    rank is given), so options are dropped one at a time, each only if the config built from those still
    kept reproduces every option's value.
    """
    kept = dict(sorted(options.items()))
    for key in list(kept):
        trial = {k: v for k, v in kept.items() if k != key}
        try:
            built = cls(sparsity=sparsity, **trial)
        except ValueError:  # e.g. diagonal_dampening > 0 once weight_update="sweep" is dropped
            continue
        flat = flat_config(built.to_dict())
        if all(flat.get(k) == v for k, v in options.items()):
            kept = trial
    return tuple(kept.items())


def expand_config_names(
    requested: Sequence[str], sparsities: Sequence[float], ablation_sparsity: float | None = None
) -> list[StudyConfig]:
    """Expand groups (``main``, ``ablations``, ``explore``) and bare names (over ``sparsities``) into configs,
    without duplicates (by canonical name), in request order."""
    if not sparsities:
        raise ValueError("give at least one sparsity")
    first = ablation_sparsity if ablation_sparsity is not None else sparsities[0]
    names: list[str] = []
    for item in requested:
        item = item.strip()
        if item == "main":
            names.append("dense")
            names += [f"{base}@{_format_percent(s)}" for s in sparsities for base in MAIN_BASES]
        elif item == "ablations":
            names += [
                f"{alias}@{_format_percent(first)}"
                for alias in (
                    "wanda-en",
                    mwanda_variance_ablation(),
                    "mwanda-no-actprob",
                    mwanda_layerwise_ablation(),
                    "mwanda-no-compensation",
                    "mwanda-pooled-compensation",
                )
            ]
        elif item == "explore":
            names += EXPLORE_50
        elif "@" not in item and item != "dense":
            names += [f"{item}@{_format_percent(s)}" for s in sparsities]
        else:
            names.append(item)
    return unique_by_name(names, parse_config_name)


def unique_by_name(names: Iterable[str], parse: Callable[[str], Any]) -> list[Any]:
    """``parse`` of every name, keeping the first of each canonical ``.name`` (spellings of one run differ)."""
    parsed: dict[str, Any] = {}
    for name in names:
        item = parse(name)
        parsed.setdefault(item.name, item)
    return list(parsed.values())


# ---------------------------------------------------------------------------------------------------------
# summaries (pure functions on result dicts)
# ---------------------------------------------------------------------------------------------------------
def arithmetic_mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def compare_configs(
    candidate: Mapping[str, float], baseline: Mapping[str, float], languages: Sequence[str]
) -> dict[str, Any]:
    """How ``candidate`` perplexities fare against ``baseline`` on ``languages`` (lower is better).

    Returns the geometric and arithmetic means of both, the relative change of the geometric mean, and the
    languages where the candidate is strictly lower (``wins``).
    """
    missing = [lang for lang in languages if lang not in candidate or lang not in baseline]
    if missing:
        raise ValueError(f"no perplexity for {missing} in one of the compared results")
    cand = [candidate[lang] for lang in languages]
    base = [baseline[lang] for lang in languages]
    wins = [lang for lang, c, b in zip(languages, cand, base) if c < b]
    geo_c, geo_b = geometric_mean(cand), geometric_mean(base)
    return {
        "geomean": geo_c,
        "baseline_geomean": geo_b,
        "mean": arithmetic_mean(cand),
        "baseline_mean": arithmetic_mean(base),
        "geomean_change": geo_c / geo_b - 1.0 if geo_b else math.nan,
        "wins": wins,
        "n_wins": len(wins),
        "n_languages": len(languages),
    }


def research_verdict(
    results: Mapping[str, Mapping[str, Any]], languages: Sequence[str], sparsity: float, min_wins: int = 5
) -> dict[str, Any] | None:
    """Does default M-Wanda beat Wanda at ``sparsity`` on the mean (geometric and arithmetic) held-out
    perplexity and on at least ``min_wins`` languages? ``None`` when either result is missing."""
    percent = _format_percent(sparsity)
    mwanda, wanda = results.get(f"mwanda@{percent}"), results.get(f"wanda@{percent}")
    if not mwanda or not wanda or "perplexity" not in mwanda or "perplexity" not in wanda:
        return None
    comparison = compare_configs(mwanda["perplexity"], wanda["perplexity"], languages)
    comparison["sparsity"] = sparsity
    comparison["beats_geomean"] = comparison["geomean"] < comparison["baseline_geomean"]
    comparison["beats_mean"] = comparison["mean"] < comparison["baseline_mean"]
    comparison["beats"] = bool(
        comparison["beats_geomean"] and comparison["beats_mean"] and comparison["n_wins"] >= min_wins
    )
    comparison["min_wins"] = min_wins
    return comparison


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if value < 1000 else f"{value:.0f}"


def results_table(
    results: Mapping[str, Mapping[str, Any]],
    order: Sequence[str],
    languages: Sequence[str],
    extra_languages: Sequence[str] = (),
) -> str:
    """Markdown table: a row per configuration in ``order`` (missing ones skipped), columns = languages,
    their geometric mean, the extra languages and their geometric mean, prune seconds."""
    header = ["configuration", *languages, "**geomean**"]
    if extra_languages:
        header += [f"{lang}*" for lang in extra_languages] + ["geomean*"]
    header.append("prune s")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in order:
        result = results.get(name)
        if not result:
            continue
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error']} |" + " |" * (len(header) - 2))
            continue
        ppl = result["perplexity"]
        row = [name, *(_fmt(ppl.get(lang)) for lang in languages)]
        row.append(f"**{_fmt(geometric_mean(ppl.get(lang, math.nan) for lang in languages))}**")
        if extra_languages:
            row += [_fmt(ppl.get(lang)) for lang in extra_languages]
            row.append(_fmt(geometric_mean(ppl.get(lang, math.nan) for lang in extra_languages)))
        row.append(_fmt(result.get("prune_seconds"), 0) if result.get("prune_seconds") else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparison_table(
    results: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    baseline: str,
    languages: Sequence[str],
    extra_languages: Sequence[str] = (),
) -> str:
    """Markdown table of each configuration in ``names`` against ``baseline``: geomean, change, wins."""
    base = results.get(baseline)
    if not base or "perplexity" not in base:
        return f"(no result for the baseline {baseline})"
    header = "| configuration | geomean | vs " + baseline + " | wins | mean |"
    if extra_languages:
        header += " geomean* | vs " + baseline + "* | wins* |"
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for name in names:
        result = results.get(name)
        if not result or "perplexity" not in result:
            continue
        c = compare_configs(result["perplexity"], base["perplexity"], languages)
        row = [
            name,
            _fmt(c["geomean"]),
            f"{100 * c['geomean_change']:+.1f}%",
            f"{c['n_wins']}/{c['n_languages']}",
            _fmt(c["mean"]),
        ]
        if extra_languages:
            e = compare_configs(result["perplexity"], base["perplexity"], extra_languages)
            row += [
                _fmt(e["geomean"]),
                f"{100 * e['geomean_change']:+.1f}%",
                f"{e['n_wins']}/{e['n_languages']}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict_lines(verdict: Mapping[str, Any] | None, sparsity: float) -> list[str]:
    percent = _format_percent(sparsity)
    if verdict is None:
        return [f"- {percent}%: not measured yet (needs wanda@{percent} and mwanda@{percent})."]
    answer = "**yes**" if verdict["beats"] else "**no**"
    return [
        f"- {percent}%: {answer}. Geometric mean M-Wanda {_fmt(verdict['geomean'])} vs Wanda "
        f"{_fmt(verdict['baseline_geomean'])} ({100 * verdict['geomean_change']:+.1f}%); arithmetic mean "
        f"{_fmt(verdict['mean'])} vs {_fmt(verdict['baseline_mean'])}; lower on {verdict['n_wins']}/"
        f"{verdict['n_languages']} languages ({', '.join(verdict['wins']) or 'none'}; "
        f"needed {verdict['min_wins']})."
    ]


# ---------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------
def settings_key(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a cached result must share to be reused."""
    return {
        "model": args.model,
        "languages": list(args.languages),
        "extra_eval_languages": list(args.extra_eval_languages),
        "samples_per_language": args.samples_per_language,
        "seq_len": args.seq_len,
        "eval_seq_len": args.eval_seq_len,
        "max_windows": args.max_windows,
        "extra_max_windows": args.extra_max_windows,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


# Config fields that are study settings (recorded in ``settings_key``), not part of a configuration's name.
_SETTING_FIELDS = {"method", "sparsity", "samples_per_language", "calibration_seq_len", "batch_size", "seed"}


def canonical_name(key: str, record: Mapping[str, Any]) -> str:
    """The name a cached record has under the *current* config defaults.

    Names drop options equal to the defaults, so when a default changes (as MWandaConfig's did after the
    first study) an old ``mwanda@50`` record no longer means the default; renaming it from its stored
    config keeps every row truthful.
    """
    config = record.get("config")
    if not config or key == "dense":
        return key
    from optimum_mwanda.configuration import config_class_for_method

    cls = config_class_for_method(config["method"])
    fields = flat_config(cls(sparsity=config["sparsity"]).to_dict())
    config = flat_config(config)
    # A field added after a record was written did not exist then: the record ran with the value the
    # config class rebuilds it with (the behaviour before the field).
    config = {**cls.fields_added_later, **config}
    options = {
        k: v
        for k, v in config.items()
        if k not in _SETTING_FIELDS and k != "optimum_mwanda_version" and k in fields
    }
    if config["method"] == "mwanda" and config.get("weight_update") != "sweep":
        # The Hessian's token sample does not exist for the closed form: its stored value changed nothing.
        options.pop("hessian_token_stride", None)
    english_only = key.startswith("wanda-en")
    kept = non_default_options(cls, config["sparsity"], options)
    return StudyConfig(config["method"], config["sparsity"], kept, english_only).name


def load_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"results": {}}
    cache = json.loads(path.read_text(encoding="utf-8"))
    cache["results"] = {canonical_name(k, r): r for k, r in cache.get("results", {}).items()}
    return cache


def merge_caches(cache: dict[str, Any], others: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``cache`` with the finished records and the commands of ``others`` added; a record ``cache`` already
    has is kept (the first run of a configuration under the same settings wins)."""
    results = cache.setdefault("results", {})
    commands = cache.setdefault("commands", [])
    for other in others:
        for name, record in other.get("results", {}).items():
            if "perplexity" in record and name not in results:
                results[name] = record
        for command in other.get("commands", []):
            if command not in commands:
                commands.append(command)
    return cache


def save_cache(path: Path, cache: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: never a half-written cache behind an interrupted run.
    write_file(path, json.dumps(cache, indent=2, sort_keys=False) + "\n", durable=False)


def load_model(model_id: str):
    import torch

    if model_id == "demo":
        from optimum_mwanda.demo import load_demo_model

        return load_demo_model(dtype=torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_id)


def study_pruning_config(config: StudyConfig, args: argparse.Namespace):
    """``config``'s package config with the study's calibration settings (``None`` for ``dense``)."""
    return config.pruning_config(
        samples_per_language=args.samples_per_language,
        calibration_seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def prune_config(model, config: StudyConfig, calibration, args: argparse.Namespace) -> dict[str, Any]:
    """Prune ``model`` in place as ``config`` says (nothing for ``dense``), with the study's calibration
    settings; returns the record fields: the config, prune seconds, timings, achieved sparsities."""
    from optimum_mwanda import Pruner

    pruning = study_pruning_config(config, args)
    if pruning is None:
        return {}
    report = Pruner(pruning).prune_model(model, calibration, show_progress=args.progress)
    return {
        "config": pruning.to_dict(),
        "prune_seconds": report.timings["total"],
        "timings": report.timings,
        "achieved_sparsity": report.achieved_sparsity,
        "layer_sparsity": report.layer_sparsity,
        "layerwise_signal": report.layerwise_signal,
        "calibration_tokens": report.token_counts,
    }


def study_calibration(
    tokenizer, args: argparse.Namespace, languages: Sequence[str] | None = None, samples: int | None = None
):
    """The study's calibration set from the bundled corpus: ``args.languages`` x ``args.samples_per_language``
    sequences of ``args.seq_len`` tokens drawn with ``args.seed`` (``languages``/``samples`` override the first two).
    """
    from optimum_mwanda.calibration import default_calibration

    return default_calibration(
        tokenizer,
        languages=args.languages if languages is None else languages,
        samples_per_language=args.samples_per_language if samples is None else samples,
        seq_len=args.seq_len,
        seed=args.seed,
    )


def run_study(args: argparse.Namespace, configs: Sequence[StudyConfig]) -> dict[str, Any]:
    """Prune and evaluate every configuration not already cached; the cache is saved after each one."""
    import torch

    from optimum_mwanda.calibration import load_bundled_corpus
    from optimum_mwanda.evaluation import evaluate_perplexity

    torch.set_num_threads(args.threads)
    json_path = args.output.with_suffix(".json")
    cache = load_cache(json_path)
    key = settings_key(args)
    results: dict[str, Any] = cache.setdefault("results", {})

    def cached(config) -> bool:
        # A cached result counts only with the same settings AND the same pruning config: a name like
        # ``mwanda@50`` follows the current defaults of MWandaConfig, which may have changed since.
        record = results.get(config.name, {})
        if record.get("settings") != key:
            return False
        pruning = study_pruning_config(config, args)
        if pruning is None:
            return True
        expected = {k: v for k, v in pruning.to_dict().items() if k != "optimum_mwanda_version"}
        got = {k: v for k, v in record.get("config", {}).items() if k != "optimum_mwanda_version"}
        return expected == got

    todo = [c for c in configs if not cached(c)]
    skipped = [c.name for c in configs if c not in todo]
    if skipped:
        print(f"[study] cached, skipped: {', '.join(skipped)}", flush=True)
    if not todo:
        return cache

    model, tokenizer = load_model(args.model)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = study_calibration(tokenizer, args)
    # Same total budget, one language: every sequence English.
    english = study_calibration(tokenizer, args, ["en"], args.samples_per_language * len(args.languages))
    heldout = load_bundled_corpus("heldout", args.languages)
    extra = load_bundled_corpus("heldout", args.extra_eval_languages) if args.extra_eval_languages else {}
    loss_impl = "auto"  # checked against the full logits once, then reused

    def evaluate(texts: Mapping[str, list[str]], max_windows: int) -> Any:
        nonlocal loss_impl
        result = evaluate_perplexity(
            model,
            tokenizer,
            texts,
            seq_len=args.eval_seq_len,
            max_windows=max_windows,
            show_progress=args.progress,
            return_details=True,
            loss_impl=loss_impl,
        )
        loss_impl = result.loss_impl
        return result

    for i, config in enumerate(todo, 1):
        print(f"[study] ({i}/{len(todo)}) {config.name}", flush=True)
        model.load_state_dict(dense_state)
        record: dict[str, Any] = {"settings": key, "method": config.method, "sparsity": config.sparsity}
        try:
            record.update(prune_config(model, config, english if config.english_only else calibration, args))
            t = time.perf_counter()
            main = evaluate(heldout, args.max_windows)
            extra_result = evaluate(extra, args.extra_max_windows) if extra else None
            record["eval_seconds"] = time.perf_counter() - t
            record["perplexity"] = {
                **main.perplexities,
                **(extra_result.perplexities if extra_result else {}),
            }
            record["scored_tokens"] = {**main.tokens, **(extra_result.tokens if extra_result else {})}
            record["geomean"] = geometric_mean(main.perplexities[lang] for lang in args.languages)
            print(
                f"[study] {config.name}: geomean {record['geomean']:.2f}, prune "
                f"{record.get('prune_seconds', 0):.0f} s, eval {record['eval_seconds']:.0f} s; "
                + ", ".join(f"{k} {v:.1f}" for k, v in record["perplexity"].items()),
                flush=True,
            )
        except (FloatingPointError, RuntimeError, ValueError) as err:
            # One failing configuration (e.g. non-finite activations) must not lose the others.
            record["error"] = f"{type(err).__name__}: {err}"
            print(f"[study] {config.name} failed: {record['error']}", flush=True)
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results[config.name] = record
        cache["environment"] = _environment(args)
        save_cache(json_path, cache)
    model.load_state_dict(dense_state)
    return cache


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "threads": args.threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _ordered_names(results: Mapping[str, Any], sparsities: Sequence[float]) -> list[str]:
    """Dense, then per sparsity: main methods, ablations, the rest alphabetically."""
    order = ["dense"] if "dense" in results else []
    known = set(order)
    all_sparsities = sorted({r.get("sparsity", 0.0) for r in results.values()} | set(sparsities))
    for s in all_sparsities:
        if s == 0.0:
            continue
        p = _format_percent(s)
        preferred = [f"{b}@{p}" for b in (*MAIN_BASES, "wanda-en")]
        preferred += [parse_config_name(f"{a}@{p}").name for a in ALIASES]
        rest = sorted(n for n, r in results.items() if r.get("sparsity") == s and n not in preferred)
        for name in preferred + rest:
            if name in results and name not in known:
                order.append(name)
                known.add(name)
    return order


def write_report(cache: Mapping[str, Any], args: argparse.Namespace, command: str) -> str:
    """Write the markdown and the plot next to the JSON; returns the markdown."""
    key = settings_key(args)
    results = {n: r for n, r in cache.get("results", {}).items() if r.get("settings") == key}
    languages, extras = list(args.languages), list(args.extra_eval_languages)
    order = _ordered_names(results, args.sparsities)
    env = cache.get("environment", {})
    dense_tokens = results.get("dense", {}).get("scored_tokens", {})
    lines = [
        "# Multilingual study: per-language held-out perplexity of pruned Gemma 3 270M",
        "",
        f"Command: `{command}`",
        "",
        f"- Model: {args.model} (the demo model is Gemma 3 270M, Q4_K_M GGUF dequantized to float32).",
        f"- Calibration: bundled corpus, calibration split, {len(languages)} languages ({', '.join(languages)}) "
        f"x {args.samples_per_language} sequences x {args.seq_len} tokens, seed {args.seed}, batch "
        f"{args.batch_size}; `wanda-en` uses {args.samples_per_language * len(languages)} English sequences "
        "(same total tokens).",
        f"- Evaluation: bundled corpus, held-out split, non-overlapping {args.eval_seq_len}-token windows "
        f"(BOS + {args.eval_seq_len - 1} scored tokens), the first {args.max_windows} windows per calibration "
        f"language and {args.extra_max_windows} per extra language"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in dense_tokens.items())} scored tokens)."
            if dense_tokens
            else "."
        ),
        f"- Headline: geometric mean over the {len(languages)} calibration languages. Columns marked * are "
        f"languages absent from calibration ({', '.join(extras) or 'none'}).",
        f"- Machine: {env.get('platform', '?')}, {env.get('threads', '?')} CPU thread(s), torch "
        f"{env.get('torch', '?')}, transformers {env.get('transformers', '?')}. Prune seconds are wall time "
        "of `Pruner.prune_model` on that one thread.",
        "",
        "## Results",
        "",
        results_table(results, order, languages, extras),
        "",
        "## Does default M-Wanda beat Wanda?",
        "",
        f"Criterion: lower geometric and arithmetic mean perplexity over the {len(languages)} calibration "
        "languages and lower perplexity on at least 5 of them.",
        "",
    ]
    for s in args.sparsities:
        lines += verdict_lines(research_verdict(results, languages, s), s)
    for s in sorted({r.get("sparsity") for r in results.values() if r.get("sparsity")}):
        p = _format_percent(s)
        variants = [n for n in order if results[n].get("sparsity") == s and n != f"wanda@{p}"]
        if f"wanda@{p}" in results and variants:
            lines += [
                "",
                f"## Against Wanda at {p}%",
                "",
                comparison_table(results, variants, f"wanda@{p}", languages, extras),
            ]
    errors = [n for n in order if "error" in results[n]]
    if errors:
        lines += ["", "Failed configurations: " + ", ".join(errors)]
    markdown = "\n".join(lines) + "\n"
    args.output.with_suffix(".md").write_text(markdown, encoding="utf-8")
    try:
        plot_results(results, languages, extras, args.output.with_suffix(".png"))
    except ImportError:
        print("[study] matplotlib is not installed: no plot", flush=True)
    return markdown


def plot_results(
    results: Mapping[str, Mapping[str, Any]], languages: Sequence[str], extras: Sequence[str], path: Path
) -> None:
    """Grouped bars (log scale): one panel per sparsity, a group per language plus the geomean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = sorted({r["sparsity"] for r in results.values() if r.get("sparsity") and "perplexity" in r})
    if not sparsities:
        return
    columns = [*languages, "geomean", *extras]
    fig, axes = plt.subplots(len(sparsities), 1, figsize=(12, 4.2 * len(sparsities)), squeeze=False)
    for ax, s in zip(axes[:, 0], sparsities):
        p = _format_percent(s)
        names = ["dense"] + [f"{b}@{p}" for b in (*MAIN_BASES, "wanda-en")]
        names = [n for n in names if n in results and "perplexity" in results[n]]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            ppl = results[name]["perplexity"]
            values = [
                geometric_mean(ppl[lang] for lang in languages)
                if col == "geomean"
                else ppl.get(col, math.nan)
                for col in columns
            ]
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(columns))]
            ax.bar(xs, values, width=width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([f"{c}*" if c in extras else c for c in columns])
        ax.axvline(len(languages) + 0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"Gemma 3 270M at {p}% sparsity (* = not in calibration)")
        if names:  # a run of only non-main configurations has nothing to label
            ax.legend(fontsize=8, ncol=len(names))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_merge_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--merge JSON [JSON ...]``: other outputs of the same benchmark to fold into this one."""
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="JSON", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="demo", help="'demo' (Gemma 3 270M from its PyPI package) or a path"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["main", "ablations"],
        help="configuration names, bare names (expanded over --sparsities) or groups: main, ablations, explore",
    )
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6])
    parser.add_argument("--languages", nargs="+", default=CALIBRATION_LANGUAGES)
    parser.add_argument("--extra-eval-languages", nargs="*", default=EXTRA_EVAL_LANGUAGES)
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument(
        "--max-windows", type=int, default=4, help="held-out windows per calibration language"
    )
    parser.add_argument("--extra-max-windows", type=int, default=2, help="windows per extra language")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: leave a core to others)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="path without suffix")
    parser.add_argument("--report-only", action="store_true", help="rewrite md/png from the JSON cache")
    add_merge_argument(
        parser,
        "add the finished results (and commands) of other study outputs, e.g. shards run in parallel "
        "with --output elsewhere; implies --report-only",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for s in args.sparsities:
        if not 0 < s < 1:
            raise SystemExit(f"--sparsities must lie in (0, 1), got {s}")
    try:
        configs = expand_config_names(args.configs, args.sparsities)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/multilingual_study.py " + " ".join(shlex.quote(a) for a in argv)
    json_path = args.output.with_suffix(".json")
    if args.report_only or args.merge:
        cache = load_cache(json_path)
        if args.merge:
            cache = merge_caches(cache, [load_cache(path) for path in args.merge])
            save_cache(json_path, cache)
    else:
        cache = run_study(args, configs)
        commands = cache.setdefault("commands", [])
        if command.strip() not in commands:
            commands.append(command.strip())
        save_cache(json_path, cache)
    commands = cache.get("commands") or [command.strip()]
    print(write_report(cache, args, " && ".join(commands)))


if __name__ == "__main__":
    main()
