"""What the one-shot screening scripts (``research/mwanda*_screening.py``) share.

Every screen loads the demo model, collects statistics of every prunable module on the *dense* model,
writes each variant's weights, measures held-out perplexity, restores the dense weights and keeps the
results in ``research/results/<name>.{json,md}`` (a rerun skips what is already there). Each step has one
home here so that the screens measure their variants the same way; what they screen stays in the scripts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch

from optimum_mwanda.calibration import CalibrationSet, default_calibration, load_bundled_corpus
from optimum_mwanda.demo import load_demo_model
from optimum_mwanda.evaluation import evaluate_perplexity, geometric_mean
from optimum_mwanda.modeling import find_decoder_stack, find_prunable_linears

RESULTS = Path(__file__).parent / "results"
LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]


class ScreeningData(NamedTuple):
    """The demo model (in eval mode), its tokenizer, the calibration set and the held-out texts."""

    model: torch.nn.Module
    tokenizer: Any
    calibration: CalibrationSet
    heldout: dict[str, list[str]]


def add_screening_arguments(parser: argparse.ArgumentParser, threads: int) -> None:
    """``--samples-per-language``, ``--max-windows`` and ``--threads``: the budget every screen shares.

    Added after the script's own ``--sparsity`` and before its other flags, so ``--help`` and the
    ``settings`` recorded in the results keep their order.
    """
    parser.add_argument("--samples-per-language", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=threads)


def load_screening_data(
    samples_per_language: int, seed: int = 0, absent_languages: Sequence[str] = ()
) -> ScreeningData:
    """The demo model and tokenizer, the bundled calibration set of :data:`LANGUAGES` and their held-out text.

    ``absent_languages`` (not calibrated on) are evaluated too; they do not enter the geometric mean that
    :func:`score_and_restore` returns.
    """
    model, tokenizer = load_demo_model()
    model.eval()
    calibration = default_calibration(
        tokenizer, languages=LANGUAGES, samples_per_language=samples_per_language, seed=seed
    )
    heldout = load_bundled_corpus("heldout", languages=[*LANGUAGES, *absent_languages])
    return ScreeningData(model, tokenizer, calibration, heldout)


def prunable_modules(model: torch.nn.Module) -> list:
    """Every prunable linear module of every decoder layer, in layer order."""
    stack = find_decoder_stack(model)
    return [
        m
        for i, layer in enumerate(stack.layers)
        for m in find_prunable_linears(layer, stack.layer_name(i), [])
    ]


def forward_calibration(
    model: torch.nn.Module,
    calibration: CalibrationSet,
    collectors: Iterable,
    group_index: torch.Tensor,
    batch_size: int = 4,
) -> None:
    """Run the calibration set through the dense decoder with every collector attached.

    Each collector is told a batch's attention mask and the group (language or sequence) of its rows before
    the forward pass and closes the batch after it.
    """
    collectors = list(collectors)
    with ExitStack() as ctx, torch.no_grad():
        for collector in collectors:
            ctx.enter_context(collector.attached())
        for start in range(0, len(calibration), batch_size):
            ids = calibration.input_ids[start : start + batch_size]
            mask = calibration.attention_mask[start : start + batch_size]
            for collector in collectors:
                collector.set_batch(mask, group_index[start : start + batch_size])
            model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            for collector in collectors:
                collector.end_batch()


def score_and_restore(
    data: ScreeningData, modules: Sequence, originals: Mapping[str, torch.Tensor], max_windows: int
) -> tuple[dict[str, float], float]:
    """Held-out perplexity per language of the weights the modules hold now, and its geometric mean over
    the calibration :data:`LANGUAGES`.

    The dense weights are written back afterwards, so the next variant starts from the dense model.
    """
    ppl = evaluate_perplexity(
        data.model, data.tokenizer, data.heldout, max_windows=max_windows, show_progress=False
    )
    for m in modules:
        m.write_weight(originals[m.name])
    return ppl, geometric_mean(ppl[lang] for lang in LANGUAGES)


def load_results(output: Path) -> dict[str, Any]:
    """The ``results`` already in ``output``'s JSON (empty when there is none yet), so a rerun resumes."""
    path = output.with_suffix(".json")
    return json.loads(path.read_text()).get("results", {}) if path.exists() else {}


def write_results(output: Path, record: Mapping[str, Any], lines: Sequence[str]) -> None:
    """Write ``record`` to ``output.json`` and the markdown ``lines`` to ``output.md``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")


def table_head(columns: Sequence[tuple[str, str]]) -> list[str]:
    """The header and alignment rows of a screen's table: ``(title, alignment)`` columns, then a language each."""
    return [
        "| " + " | ".join(title for title, _ in columns) + " | " + " | ".join(LANGUAGES) + " |",
        "|" + "".join(f"{align}|" for _, align in columns) + "---:|" * len(LANGUAGES),
    ]


def table_row(cells: Sequence[str], result: Mapping[str, Any]) -> str:
    """One table row: ``cells``, then the result's perplexity in each language."""
    return (
        "| "
        + " | ".join(cells)
        + " | "
        + " | ".join(f"{result['perplexity'][lang]:.1f}" for lang in LANGUAGES)
        + " |"
    )


def versus_wanda(results: Mapping[str, Mapping[str, Any]], key: str) -> str:
    """``key``'s geomean relative to Wanda's at the same sparsity (keys are ``"<sparsity> | <variant>"``)."""
    target, _ = key.split(" | ")
    base = results.get(f"{target} | wanda", {}).get("geomean")
    return f"{results[key]['geomean'] / base:.3f}" if base else "-"
