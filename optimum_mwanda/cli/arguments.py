"""Argument definitions of the ``optimum-mwanda`` commands, shared with the ``optimum-cli`` plugin.

This module must stay import-light: standard library only, no relative imports. ``optimum-cli`` imports every
registered plugin at start-up (also for ``optimum-cli export ...``), so the plugin loads this file on its own,
without ``optimum_mwanda/__init__.py`` and its torch/transformers imports (about two seconds). The method
choices and method flags come from the method registry (``optimum_mwanda/methods/registry.py``, standard
library only too); the values are validated again by the library when a command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_REGISTRY_MODULE = "optimum_mwanda.methods.registry"


def method_registry() -> ModuleType:
    """The method registry: the library's module when it is imported (with every method registered so
    far), else this file's sibling loaded on its own (no torch)."""
    if _REGISTRY_MODULE in sys.modules:
        return sys.modules[_REGISTRY_MODULE]
    private = "_optimum_mwanda_method_registry"
    if private not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "methods" / "registry.py"
        spec = importlib.util.spec_from_file_location(private, path)
        if spec is None or spec.loader is None:
            return importlib.import_module(_REGISTRY_MODULE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[private] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[private]


METHODS = method_registry().method_names()
DEFAULT_METHOD = method_registry().DEFAULT_METHOD
LAYERWISE = ("uniform", "depth", "owl", "cwl")
#: ``--hub-dataset`` names -> keys of ``optimum_mwanda.calibration.HUB_CORPORA``
HUB_DATASETS = {
    "culturax": "culturax",
    "fineweb2": "fineweb-2",
    "fineweb-2": "fineweb-2",
    "mc4": "mc4",
    "wikipedia": "wikipedia",
    "flores": "flores",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: evaluation windows per language unless told otherwise (``--max-windows all`` scores every window): about
#: 4k tokens per language, a minute for two languages on a 2-core CPU with the demo model
DEFAULT_EVAL_WINDOWS = 8
DEMO = "demo"

#: deprecated command names -> today's (``sweep`` is SparseGPT's column sweep now, not the matrix)
COMMAND_ALIASES = {"sweep": "language-matrix"}

#: Files written by ``language-matrix --output-dir`` (names kept from when the command was ``sweep``).
SWEEP_FILES = {"json": "sweep.json", "markdown": "sweep.md", "heatmap": "sweep_heatmap.png"}

COMMAND_HELP = {
    "prune": "prune a causal LM one-shot (Wanda, SparseGPT, M-Wanda) and save and/or push it",
    "eval": "per-language perplexity of a model on held-out text",
    "language-matrix": "calibration-language x evaluation-language perplexity matrix, with a heatmap",
    "card": "regenerate the model card (README.md) of a saved pruned checkpoint",
}

PRUNE_EPILOG = """\
examples:
  %(prog)s --output-dir gemma-3-270m-mwanda-50               # the embedded demo model, bundled corpus
  %(prog)s --model meta-llama/Llama-3.2-1B --method wanda --mask-structure 2:4 \\
      --languages en de sw --device-map auto --output-dir llama-2of4
  %(prog)s --model ./my-model --data texts/ --languages de,sw --samples-per-language 16 --seq-len 1024 \\
      --eval --output-dir pruned --push-to-hub you/my-model-mwanda-50 --private
  %(prog)s --config prune.yaml --sparsity 0.6 --output-dir out --json > report.json

Calibration text: the bundled multilingual corpus by default; --data reads local files (.txt, .jsonl,
.parquet; the language comes from the file name such as de.txt, or a 'lang' field); --hub-dataset streams
a Hub corpus (needs --languages). --config takes a JSON or YAML file with PruningConfig fields
(PruningConfig.to_dict()); flags given on the command line override it.
Saving keeps every file in --output-dir that optimum-mwanda did not write and replaces its own files in one
crash-consistent swap; --languages takes commas and/or spaces (en,de,sw or en de sw).
exit codes: 0 success, 2 invalid arguments, config or data (nothing loaded or written), 1 failure while running.
"""

EVAL_EPILOG = """\
examples:
  %(prog)s gemma-3-270m-mwanda-50 --languages en,de,sw --max-windows 20
  %(prog)s ./my-model --data heldout/ --seq-len 1024 --max-windows all --json > ppl.json
  %(prog)s ./my-model --tasks xcopa --task-data shared/benchmarks/xcopa --no-perplexity

The mean over languages is the geometric mean. Give MODEL before --languages (which takes several values).
"""

SWEEP_EPILOG = """\
examples:
  %(prog)s --languages en,de,sw --eval-languages en,de,sw,zh --mix all=en+de+sw --output-dir sweep/
  %(prog)s ./my-model --method wanda --data texts/ --eval-data heldout/ --output-dir sweep/ --max-windows 8

Each row prunes a fresh copy of the model calibrated on one language (or one --mix); every row is evaluated
on every evaluation language. Writes sweep.json, sweep.md and sweep_heatmap.png into --output-dir.
"""

CARD_EPILOG = """\
examples:
  %(prog)s gemma-3-270m-mwanda-50
  %(prog)s gemma-3-270m-mwanda-50 --eval-results evals.json --base-model google/gemma-3-270m

--eval-results is a JSON file {"before": {"en": 21.3, ...}, "after": {"en": 25.1, ...}} (either half may be
missing). Without it the card keeps the results saved with the checkpoint (eval_results.json, written by every
save given evaluation results), or else the perplexities in the existing card's model-index metadata. Only
README.md and the plot are replaced (and eval_results.json with --eval-results); weights and your own files stay.
"""


def comma_list(value: str) -> list[str]:
    """``"en,de, sw"`` -> ``["en", "de", "sw"]`` (argparse type; empty items are dropped)."""
    items = [item.strip() for item in value.split(",")]
    return [item for item in items if item]


class ExampleHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a docstring's line breaks and shows every option's default (the example scripts' ``--help``)."""


class LanguageListAction(argparse.Action):
    """``--languages en,de,sw`` and ``--languages en de sw`` (or a mix) both give ``["en", "de", "sw"]``.

    Use with ``nargs="+"``; shared by the CLI and the example scripts.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [item for value in values for item in comma_list(value)])


def add_language_list(group, *flags: str, help: str, default: list[str] | None = None) -> None:
    """A ``LANG [LANG ...]`` option accepting commas and/or spaces (the CLI's and the examples')."""
    group.add_argument(
        *flags, nargs="+", action=LanguageListAction, default=default, metavar="LANG", help=help
    )


def add_example_pruning_arguments(group) -> None:
    """``--method`` and ``--sparsity`` as the example scripts take them.

    The examples default to M-Wanda at 50%; the CLI's own flags default to ``None`` instead, so that only
    flags given on the command line override a ``--config`` file.
    """
    group.add_argument(
        "--method", choices=method_registry().method_names(), default=DEFAULT_METHOD, help="pruning method"
    )
    group.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights set to zero")


def window_budget(value: str) -> int | None:
    """``--max-windows``: a positive integer, or ``all`` (``None``: score every window)."""
    if value.strip().lower() == "all":
        return None
    return _positive_int(value)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``--quiet``, ``--verbose``: shared by every command."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable JSON result on stdout (logs and progress stay on stderr)",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no info logs")
    group.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs, and the traceback of a failure"
    )


def add_model_arguments(parser: argparse.ArgumentParser, positional: bool) -> None:
    """The model to load and how to place it."""
    group = parser.add_argument_group("model")
    model_help = (
        "a local model folder or a Hub model id; 'demo' (the default) is the embedded Gemma 3 270M "
        "(needs optimum-mwanda[demo])"
    )
    if positional:
        group.add_argument("model", nargs="?", default=None, help=model_help)
    else:
        group.add_argument("--model", "-m", default=None, help=model_help)
    group.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    group.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="parameter dtype (default: the checkpoint's)"
    )
    group.add_argument(
        "--device-map",
        default=None,
        help="Accelerate device map: 'auto', 'balanced', 'sequential', 'cpu', 'cuda:0', ... or a JSON object "
        "{module: device}; default: load on the CPU",
    )
    group.add_argument(
        "--max-memory",
        default=None,
        metavar="DEVICE=SIZE,...",
        help="memory per device for --device-map, e.g. '0=20GiB,cpu=64GiB'",
    )
    group.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="folder for weights offloaded to disk by --device-map",
    )
    group.add_argument("--revision", default=None, help="Hub revision of the model (branch, tag or commit)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Pruning config fields; every default is ``None`` so that only given flags override ``--config``."""
    group = parser.add_argument_group("pruning (flags override --config)")
    group.add_argument(
        "--config",
        "-c",
        default=None,
        metavar="FILE",
        help="JSON or YAML file with PruningConfig fields (as written by PruningConfig.to_dict())",
    )
    group.add_argument(
        "--method",
        choices=method_registry().method_names(),
        default=None,
        help=f"pruning method (default: {DEFAULT_METHOD})",
    )
    group.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        metavar="S",
        help="fraction of weights set to zero (default: 0.5)",
    )
    group.add_argument(
        "--mask-structure",
        default=None,
        metavar="unstructured|N:M",
        help="'unstructured' (default) or N:M such as 2:4; with N:M, --sparsity defaults to 1 - N/M",
    )
    group.add_argument(
        "--layerwise",
        choices=LAYERWISE,
        default=None,
        help="per-layer sparsity schedule (default: the method's: depth for mwanda, uniform for wanda and "
        "sparsegpt, and uniform whenever N:M structure is used; cwl is M-Wanda only)",
    )
    group.add_argument(
        "--ignore",
        action="append",
        default=None,
        metavar="PATTERN",
        help="module-name glob left dense (repeatable), e.g. '*.self_attn.o_proj'",
    )
    group.add_argument(
        "--samples-per-language",
        type=_positive_int,
        metavar="N",
        default=None,
        help="calibration sequences per language (default: 8)",
    )
    group.add_argument(
        "--seq-len",
        type=_positive_int,
        metavar="N",
        default=None,
        help="tokens per calibration sequence (default: 512)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=None,
        help="sequences per calibration forward pass",
    )
    group.add_argument(
        "--seed", type=int, default=None, metavar="N", help="calibration sampling seed (default: 0)"
    )
    add_method_arguments(parser)


_OPTION_TYPES = {"int": int, "float": float, "str": str}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per method-specific config field of the registered methods (``None`` unless given, so a
    ``--config`` file keeps its value); the help names the methods that take it."""
    group = parser.add_argument_group("method options (flags override --config)")
    owners: dict[str, list[str]] = {}
    options = {}
    for entry in method_registry().entries():
        for option in entry.cli_options:
            owners.setdefault(option.flag, []).append(entry.name)
            options.setdefault(option.flag, option)
    for flag, option in options.items():
        group.add_argument(
            flag,
            dest=f"method_{option.field}",
            type=_OPTION_TYPES[option.type],
            choices=option.choices,
            default=None,
            metavar=None if option.choices else {"int": "N", "float": "X"}.get(option.type, "VALUE"),
            help=f"{option.help} ({', '.join(owners[flag])})",
        )


def add_calibration_arguments(parser: argparse.ArgumentParser, languages_help: str) -> None:
    """Languages and where calibration text comes from."""
    group = parser.add_argument_group("calibration data")
    add_language_list(group, "--languages", "-l", help=languages_help)
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="local calibration texts: folders and/or .txt/.jsonl/.parquet files (default: bundled corpus)",
    )
    source.add_argument(
        "--hub-dataset",
        choices=sorted(set(HUB_DATASETS)),
        default=None,
        help="stream calibration text from a Hub corpus (needs --languages and network access)",
    )
    group.add_argument(
        "--hub-max-chars",
        type=_positive_int,
        metavar="N",
        default=1_000_000,
        help="characters streamed per language from --hub-dataset (default: 1000000)",
    )


def add_coverage_arguments(parser: argparse.ArgumentParser) -> None:
    """What happens to weights the method cannot reach, and how mixture-of-experts layers are calibrated."""
    group = parser.add_argument_group("coverage and mixture-of-experts")
    group.add_argument(
        "--allow-unpruned",
        action="store_true",
        help="leave dense (with a warning and a report entry) the decoder-layer weights the method cannot "
        "reach, instead of refusing the run",
    )
    group.add_argument(
        "--expert-weighting",
        choices=["router", "none"],
        default="none",
        help="scale each expert's calibration inputs by the token's router weight, or not (default)",
    )
    group.add_argument(
        "--calibrate-all-experts",
        action="store_true",
        help="every expert's statistics see every calibration token (the output keeps the real routing)",
    )
    group.add_argument(
        "--expert-min-tokens",
        type=int,
        default=16,
        metavar="N",
        help="experts routed fewer calibration tokens are calibrated on every token of their block (default: 16)",
    )


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prune``."""
    add_model_arguments(parser, positional=False)
    add_config_arguments(parser)
    add_calibration_arguments(
        parser,
        "calibration languages, comma- or space-separated (default: every language of the calibration data)",
    )
    add_coverage_arguments(parser)
    out = parser.add_argument_group("saving and pushing")
    out.add_argument(
        "--output-dir",
        "-o",
        default=None,
        metavar="DIR",
        help="save the pruned checkpoint here (a new or empty folder, or a checkpoint: only files optimum-mwanda "
        "wrote are replaced, everything else is kept)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="also save into a folder that holds no model, replacing files with checkpoint names (README.md, "
        "config.json...) that optimum-mwanda did not write",
    )
    out.add_argument(
        "--compressed",
        action="store_true",
        help="save the bitmask-packed sparse format (needs optimum-mwanda to load)",
    )
    out.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the pruned model to this Hub repo"
    )
    out.add_argument("--private", action="store_true", help="create the Hub repo as private")
    out.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    out.add_argument(
        "--base-model", default=None, metavar="HUB_ID", help="base model id named in the model card"
    )
    out.add_argument("--license", default=None, help="licence tag of the model card")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval",
        action="store_true",
        help="measure per-language held-out perplexity before and after pruning and put it in the model card",
    )
    evaluation.add_argument(
        "--eval-data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out texts for --eval, which it implies (default: the bundled held-out corpus)",
    )
    add_language_list(
        evaluation,
        "--eval-languages",
        help="languages for --eval, which it implies (default: the calibration languages)",
    )
    evaluation.add_argument(
        "--eval-seq-len",
        type=_positive_int,
        metavar="N",
        default=512,
        help="tokens per evaluation window (default: 512)",
    )
    evaluation.add_argument(
        "--eval-max-windows",
        type=window_budget,
        metavar="N|all",
        default=DEFAULT_EVAL_WINDOWS,
        help=f"evaluation windows per language (default: {DEFAULT_EVAL_WINDOWS}; 'all' scores every window)",
    )
    add_output_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``eval``."""
    add_model_arguments(parser, positional=True)
    downstream = parser.add_argument_group("downstream tasks (lm-evaluation-harness; needs the eval extra)")
    downstream.add_argument(
        "--tasks",
        type=comma_list,
        default=None,
        metavar="TASK,TASK",
        help="lm-eval tasks: the bundled offline mwanda_continuation, mwanda_translation (both directions), "
        "mwanda_translation_en_xx, mwanda_translation_xx_en (one subtask per --languages), or any lm-eval task "
        "or group name (xcopa, xnli_de, belebele_swh_Latn: downloads from the Hub unless --task-data)",
    )
    downstream.add_argument(
        "--task-data",
        nargs="+",
        default=None,
        metavar="DIR",
        help="run lm-eval's own tasks on local copies of their data found in DIR (jsonl, json, parquet, csv "
        "or a datasets save_to_disk folder per split; layout in docs/evaluation.md); a task whose data is "
        "missing is an error naming the files expected",
    )
    downstream.add_argument(
        "--limit", type=_positive_int, default=None, metavar="N", help="documents per task (quick runs)"
    )
    downstream.add_argument(
        "--num-fewshot", type=int, default=None, metavar="K", help="override the tasks' few-shot count"
    )
    downstream.add_argument(
        "--task-batch-size", type=_positive_int, default=1, metavar="N", help="lm-eval batch size (default 1)"
    )
    downstream.add_argument(
        "--include-path", default=None, metavar="DIR", help="another folder of lm-eval task YAMLs"
    )
    downstream.add_argument(
        "--no-perplexity", action="store_true", help="with --tasks: skip the held-out perplexity"
    )
    group = parser.add_argument_group("evaluation data")
    add_language_list(
        group,
        "--languages",
        "-l",
        help="languages to evaluate, comma- or space-separated (default: every language of the data)",
    )
    group.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out texts: folders and/or .txt/.jsonl/.parquet files (default: the bundled held-out corpus)",
    )
    group.add_argument(
        "--seq-len", type=_positive_int, metavar="N", default=512, help="tokens per window (default: 512)"
    )
    group.add_argument(
        "--stride",
        type=_positive_int,
        metavar="N",
        default=None,
        help="sliding-window stride (default: none)",
    )
    group.add_argument(
        "--max-windows",
        type=window_budget,
        metavar="N|all",
        default=DEFAULT_EVAL_WINDOWS,
        help=f"windows per language (default: {DEFAULT_EVAL_WINDOWS}; 'all' scores every window of the data)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=1,
        help="windows per forward pass (default: 1)",
    )
    add_output_arguments(parser)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``language-matrix`` (and its deprecated name ``sweep``)."""
    add_model_arguments(parser, positional=True)
    add_config_arguments(parser)
    add_calibration_arguments(
        parser, "calibration languages, one matrix row each (default: every language of the calibration data)"
    )
    group = parser.add_argument_group("language matrix")
    group.add_argument(
        "--mix",
        action="append",
        default=None,
        metavar="NAME=LANG+LANG",
        help="an extra row calibrated on equal shares of several languages, e.g. 'all=en+de+sw' (repeatable)",
    )
    add_language_list(
        group,
        "--eval-languages",
        help="evaluation languages, one column each (default: the calibration languages)",
    )
    group.add_argument(
        "--eval-data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out texts (default: bundled held-out corpus)",
    )
    group.add_argument(
        "--eval-seq-len",
        type=_positive_int,
        metavar="N",
        default=512,
        help="tokens per evaluation window (default: 512)",
    )
    group.add_argument(
        "--max-windows", type=_positive_int, metavar="N", default=None, help="evaluation windows per language"
    )
    group.add_argument("--no-dense", action="store_true", help="skip the dense (unpruned) baseline row")
    group.add_argument(
        "--per-language-budget",
        action="store_true",
        help="give a mix --samples-per-language sequences per language (default: the same total as a single row)",
    )
    group.add_argument(
        "--absolute",
        action="store_true",
        help="colour the heatmap by perplexity (default: by ratio to dense when the dense row exists)",
    )
    group.add_argument(
        "--output-dir",
        "-o",
        required=True,
        metavar="DIR",
        help=f"folder for {', '.join(SWEEP_FILES.values())} (created if missing; those files are replaced)",
    )
    add_output_arguments(parser)


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``card``."""
    parser.add_argument(
        "checkpoint", help="folder of a pruned checkpoint (holds pruning_report.json and config.json)"
    )
    parser.add_argument(
        "--eval-results", default=None, metavar="FILE", help="JSON file with before/after perplexities"
    )
    parser.add_argument("--eval-dataset", default=None, help="short description of the evaluation text")
    parser.add_argument(
        "--base-model", default=None, metavar="HUB_ID", help="base model id named in the card"
    )
    parser.add_argument(
        "--model-id", default=None, metavar="HUB_ID", help="the Hub id the card will live under"
    )
    parser.add_argument(
        "--license", default=None, help="licence tag (default: read from the base model's card)"
    )
    add_output_arguments(parser)


ADD_ARGUMENTS = {
    "prune": (add_prune_arguments, PRUNE_EPILOG),
    "eval": (add_eval_arguments, EVAL_EPILOG),
    "language-matrix": (add_sweep_arguments, SWEEP_EPILOG),
    "card": (add_card_arguments, CARD_EPILOG),
}


def configure_parser(parser: argparse.ArgumentParser, command: str) -> None:
    """Give ``parser`` the arguments, description and examples of ``command``."""
    command = COMMAND_ALIASES.get(command, command)
    add, epilog = ADD_ARGUMENTS[command]
    parser.description = COMMAND_HELP[command]
    parser.epilog = epilog
    # Keep the line breaks of the examples; argparse would otherwise re-wrap them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add(parser)


def build_parser(prog: str = "optimum-mwanda", version: str | None = None) -> argparse.ArgumentParser:
    """The ``optimum-mwanda`` parser: one subcommand per entry of :data:`COMMAND_HELP`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="One-shot pruning of multilingual causal LMs (Wanda, SparseGPT, M-Wanda).",
        epilog="Run '%(prog)s COMMAND --help' for the options and examples of a command.",
    )
    if version is not None:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, help_text in COMMAND_HELP.items():
        aliases = [old for old, new in COMMAND_ALIASES.items() if new == command]
        configure_parser(subparsers.add_parser(command, help=help_text, aliases=aliases), command)
    return parser
