"""Fine-tune a causal LM with HeLU in its FFN blocks and measure its perplexity, with Accelerate.

    python recipes/run_clm.py --model_name_or_path SmolLM2-135M.gguf --activation helu --max_train_steps 200 \\
        --data_dir data/wikitext-2
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/run_clm.py ...   # or `accelerate launch`
    python recipes/run_clm.py --model_name_or_path runs/clm/model --eval_only --validation_file valid.txt

--model_name_or_path: a checkpoint folder, a hub id or a .gguf file (dequantized to float32), read by hf_helu's own
loader. Data: --data_dir (train.txt/valid.txt; default $HF_HELU_DATA_DIR/wikitext-2), --train_file/--validation_file
or --dataset_name. Perplexity and the FFN dead/zero units are measured on the checkpoint, after the activation swap and
conversion, and after fine-tuning. Writes OUTPUT_DIR/results.json (--eval_only: eval_results.json), checkpoints,
OUTPUT_DIR/model and, with HeLU, OUTPUT_DIR/model_relu (stock ReLU; --check_export checks its greedy tokens without
hf_helu), each with a model card. A loss that becomes NaN or inf stops the run (exit 2) naming the step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import set_seed
from recipe_support.args import add_conversion_args, add_training_args, check_conversion_args, check_training_args
from recipe_support.models import check_stock_export
from recipe_support.output_dir import start_run
from recipe_support.paths import DATA_DIR_ENV, data_path, read_utf8
from recipe_support.results import MODEL_DIR, publish, results_file, save_model, write_results
from recipe_support.training import progress_bar, total_training_steps, train
from torch.utils.data import DataLoader

import hf_helu
from hf_helu.cli import common as loader  # hf_helu's own loader: folders, hub ids, GGUF files
from hf_helu.conversion import resolve_conversion
from hf_helu.diagnostics import decode_sparsity
from hf_helu.errors import UsageError
from hf_helu.inputs import positive_int

DECODE_PROMPTS, DECODE_NEW_TOKENS = 4, 32  # decode sparsity: greedy batch-1 decoding of 4 validation prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", type=Path, default=None, help="Folder with train.txt and valid.txt.")
    data.add_argument("--train_file", type=Path, default=None)
    data.add_argument("--validation_file", type=Path, default=None)
    data.add_argument("--dataset_name", default=None, help="A hub dataset (train and validation splits).")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--text_column", default="text")
    data.add_argument("--block_size", type=positive_int, default=256, help="Tokens per training/evaluation block.")
    data.add_argument("--max_train_tokens", type=positive_int, default=None, help="Use the first N training tokens.")
    data.add_argument("--max_eval_tokens", type=positive_int, default=8192, help="Evaluate the first N tokens.")
    add_training_args(
        parser,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        weight_decay=0.0,
        warmup_ratio=0.0,
        checkpointing_steps=100,
        save_total_limit=2,
    )
    add_conversion_args(parser).set_defaults(calibration_samples=16)
    sparsity = parser.add_argument_group("sparsity pressure (hf_helu.ActivationSparsityPenalty)")
    sparsity.add_argument(
        "--sparsity_penalty", type=float, default=0.0, help="Weight of the FFN activation L1 term (0: off)."
    )
    sparsity.add_argument("--sparsity_warmup_steps", type=int, default=0, help="Steps the weight ramps up over.")
    report = parser.add_argument_group("the stock-ReLU export")
    report.add_argument("--check_export", action="store_true", help="Check model_relu generates as the HeLU model.")
    report.add_argument("--export_prompts", type=positive_int, default=4, help="Prompts for --check_export.")
    args = parser.parse_args(argv)
    check_training_args(args)
    check_conversion_args(args)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """What only this recipe refuses, then the model's config and the text files, before anything is loaded."""
    if args.block_size < 2:
        raise UsageError(f"--block_size {args.block_size}: a block needs at least 2 tokens (one to predict)")
    if args.eval_only and args.resume_from_checkpoint:
        raise UsageError("--eval_only does not train: drop --resume_from_checkpoint")
    if args.check_export and args.activation != "helu":
        raise UsageError("--check_export checks the stock-ReLU export of a HeLU model: give --activation helu")
    if not math.isfinite(args.sparsity_penalty) or args.sparsity_penalty < 0:
        raise UsageError(f"--sparsity_penalty must be a finite number >= 0 (0: off), got {args.sparsity_penalty}")
    if args.sparsity_warmup_steps < 0:
        raise UsageError(f"--sparsity_warmup_steps must be >= 0, got {args.sparsity_warmup_steps}")
    if args.eval_only and args.sparsity_penalty:
        raise UsageError("--eval_only does not train: drop --sparsity_penalty")
    if args.distill_weight or args.save_predictions:
        raise UsageError("run_clm does not take --distill_weight or --save_predictions")
    if args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is needed: a causal-LM checkpoint folder, hub id or .gguf file")
    args.text = text_source(args)
    args.source, args.source_record = model_source(args.model_name_or_path)  # its config read: a causal LM
    args.output_dir = Path(args.output_dir or f"runs/clm_{args.activation}_s{args.seed}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Logs, the accelerator, OUTPUT_DIR claimed, the checkpoint and the hub checked: before any data or model loads.
    with start_run(args, __file__, argv, inputs=[args.model_name_or_path]) as accelerator:
        return run(args, accelerator)


def run(args: argparse.Namespace, accelerator) -> dict:
    set_seed(args.seed)
    results: dict[str, Any] = {
        "status": "running",
        "config": _jsonable(args),
        "num_processes": accelerator.num_processes,
    }

    # Data (read, and checked UTF-8, first), then the float32 model (a GGUF checkpoint dequantized): token blocks.
    texts = read_texts(args)
    model, tokenizer = loader.load_checkpoint(args.source).float(), loader.load_tokenizer(args.source)
    eval_blocks = token_blocks(tokenizer, texts, "validation", args.block_size, args.max_eval_tokens)
    eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    eval_dataloader = accelerator.prepare(DataLoader(eval_blocks, eval_batch_size, collate_fn=causal_batch))
    train_dataloader = None
    if "train" in texts:
        train_blocks = token_blocks(tokenizer, texts, "train", args.block_size, args.max_train_tokens)
        generator = torch.Generator().manual_seed(args.seed)  # its own: a resume restores the global RNG
        batch_size = args.per_device_train_batch_size
        train_dataloader = DataLoader(train_blocks, batch_size, True, generator=generator, collate_fn=causal_batch)

    # The checkpoint as it is, then with its FFN activation swapped (and converted).
    model.to(accelerator.device)
    evaluations = {"original": evaluate(args, accelerator, model, eval_dataloader, "original")}
    total_steps = None
    if not args.eval_only:
        total_steps = total_training_steps(args, len(train_dataloader), accelerator.num_processes)
    info, annealer = convert(args, accelerator, model, train_dataloader, total_steps)
    results["model"] = {**args.source_record, **info}
    if args.activation != "keep":
        evaluations["converted"] = evaluate(args, accelerator, model, eval_dataloader, "converted")

    if args.eval_only:
        results.update(status="complete", evaluations=evaluations, perplexity=_perplexities(evaluations))
        write_results(accelerator, args.output_dir, results, results_file(eval_only=True))
        return results

    model, train_info = train_with_penalty(args, accelerator, model, train_dataloader, annealer, results)
    evaluations["final"] = evaluate(args, accelerator, model, eval_dataloader, "final")
    results.update(evaluations=evaluations, perplexity=_perplexities(evaluations), train=train_info)
    if args.with_tracking:
        accelerator.log({f"perplexity/{k}": v for k, v in results["perplexity"].items()}, train_info["completed_steps"])

    # The final model (finite weights: checked by the loop), its stock-ReLU export, model cards, its generation.
    model_dir = args.output_dir / MODEL_DIR
    exported = save_model(accelerator, model, model_dir, tokenizer)
    results.update(model_dir=str(model_dir), relu_export_dir=str(exported) if exported else None)
    if accelerator.is_main_process:  # FFN zeros while decoding greedily at batch 1: what sparse_inference skips
        prompts = eval_blocks[:DECODE_PROMPTS, : min(16, args.block_size)]
        results["decode_sparsity"] = decode_sparsity(accelerator.unwrap_model(model), prompts, DECODE_NEW_TOKENS)
    if args.check_export and accelerator.is_main_process:
        prompts = eval_blocks[: args.export_prompts, : min(16, args.block_size)]
        unwrapped, batches = accelerator.unwrap_model(model), [{"input_ids": prompts}]
        check = check_stock_export(exported, unwrapped, batches, "AutoModelForCausalLM", new_tokens=16)
        results["export_check"] = check
        accelerator.print(f"export check: greedy tokens identical without hf_helu: {check['identical']}")
    publish(accelerator, args, args.model_name_or_path, results, {"perplexity": results["perplexity"]})
    results["status"] = "complete"
    write_results(accelerator, args.output_dir, results, results_file(eval_only=False))
    accelerator.print(f"results: {args.output_dir / results_file(False)}")
    return results


@torch.no_grad()
def evaluate(args, accelerator, model, eval_dataloader, label: str) -> dict:
    """Perplexity ``exp(sum of token NLLs / predicted tokens)`` of ``model`` over the validation blocks, gathered
    over processes so every block counts once, and the FFN dead/zero-unit statistics; printed with ``label``."""
    model.eval()
    sums, counts = [], []
    bar = progress_bar(args, accelerator, len(eval_dataloader), desc=f"eval {label}", iterable=eval_dataloader)
    with hf_helu.ActivationMonitor(accelerator.unwrap_model(model)) as monitor:
        for batch in bar:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            block_sums, block_counts = accelerator.gather_for_metrics(
                (nll.sum(1).double(), torch.full_like(nll[:, 0], nll.shape[1]).double())
            )
            sums.append(block_sums.cpu())
            counts.append(block_counts.cpu())
    tokens = float(torch.cat(counts).sum())
    loss = float(torch.cat(sums).sum()) / tokens
    ffn = monitor.stats(accelerator).to_dict()
    accelerator.print(
        f"[{label}] perplexity {math.exp(loss):.4g} over {int(tokens)} tokens; FFN zeros "
        f"{100 * (ffn['zero_fraction'] or 0):.1f}%, dead units {ffn['dead_units']}/{ffn['units']}"
    )
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": int(tokens), "ffn": ffn}


def convert(args, accelerator, model, train_dataloader, total_steps: int | None) -> tuple[dict, Any]:
    """``--activation`` relu/helu into the FFN blocks through ``hf_helu.convert_model`` (``--conversion``);
    returns results.json's model record and the annealer to drive (or None)."""
    if args.activation == "keep":
        return {"activation": "keep"}, None
    choice = resolve_conversion(args.conversion, activation=args.activation, model=model, training=not args.eval_only)
    calibration = None
    if "calibrate" in choice.method:
        blocks = train_dataloader.dataset[: args.calibration_samples]
        batches = blocks.split(args.per_device_train_batch_size)
        calibration = [{"input_ids": b.to(accelerator.device)} for b in batches]
    result = hf_helu.convert_model(
        model,
        choice.method,
        activation=args.activation,
        alpha=args.alpha,
        calibration_batches=calibration,
        ridge=args.calibration_ridge,
        total_steps=total_steps,
        anneal_fraction=args.anneal_fraction,
    )
    result.choice = choice
    accelerator.print(f"activation {args.activation}, conversion {choice.method} ({choice.reason})")
    info = {"activation": args.activation, "alpha": args.alpha if args.activation == "helu" else None}
    return info | {"conversion": result.to_dict()}, result.annealer


def train_with_penalty(args, accelerator, model, train_dataloader, annealer, results: dict):
    """The recipes' loop (recipe_support.training.train) on the language model's loss plus the FFN sparsity term
    (hf_helu.ActivationSparsityPenalty; 0 when off), whose weight follows the optimizer steps as the annealer does.
    Returns the prepared model and the training summary."""
    penalty = hf_helu.ActivationSparsityPenalty(model, args.sparsity_penalty, warmup_steps=args.sparsity_warmup_steps)
    terms = []  # this process's term of each batch, detached tensors (no host sync per batch)

    def loss_with_penalty(model, batch):
        loss, term = model(**batch).loss, penalty.loss()
        terms.append(term.detach())
        return loss + term

    def on_step(done: int, total: int) -> None:
        penalty.completed_steps = done
        if annealer is not None:
            annealer.on_step(done, total)
        if terms and penalty.enabled and args.with_tracking:
            accelerator.log({"sparsity_penalty": terms[-1].item()}, done)

    model, _, state = train(
        args, accelerator, model, train_dataloader, {}, None, results,
        annealer=SimpleNamespace(on_step=on_step), compute_loss=loss_with_penalty,
    )  # fmt: skip
    penalty.remove()
    wall = state.elapsed()
    return model, {
        "completed_steps": state.completed_steps,
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "sparsity_penalty": float(sum(terms)) / max(len(terms), 1),  # the mean term of this process
        "train_tokens": state.train_tokens,
        "wall_time_s": wall,
        "train_tokens_per_s": state.train_tokens / wall if wall > 0 else None,
    }


def model_source(name: str) -> tuple[Path, dict[str, Any]]:
    """``--model_name_or_path`` resolved and its config read; a config that is unreadable or not a causal LM's is a
    UsageError, before any weight is loaded. Returns what the loader takes and results.json's record of it."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        path = loader.resolve_source(name)
        cls = loader.source_model_class(path, loader.load_config(path))
    except UsageError as error:
        raise UsageError(f"--model_name_or_path {name}: {error}") from None
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    if cls.__name__ not in causal and cls is not AutoModelForCausalLM:  # the latter: a GGUF file's own config
        raise UsageError(
            f"--model_name_or_path {name} holds a {cls.__name__} (config.architectures), not a causal language model; "
            "run_clm trains a *ForCausalLM checkpoint"
        )
    gguf = loader.gguf_file(path)
    return path, {"source": str(gguf[0] if gguf else path), "gguf_file": gguf[1] if gguf else None}


def text_source(args: Any) -> dict[str, Any]:
    """``--dataset_name``, ``--train_file/--validation_file`` or ``--data_dir`` (default $HF_HELU_DATA_DIR/wikitext-2,
    train.txt/valid.txt): the files the run reads, checked to exist before anything is loaded."""
    files = args.train_file or args.validation_file
    if sum(bool(x) for x in (args.dataset_name, files, args.data_dir)) > 1:
        raise UsageError("give one of --dataset_name, --train_file/--validation_file or --data_dir, not several")
    # Training, or calibrating a conversion (also with --eval_only), reads the training text.
    splits = ["validation", "train"] if not args.eval_only or "calibrate" in args.conversion else ["validation"]
    if args.dataset_name:
        return {"dataset": splits}
    root = args.data_dir or data_path("wikitext-2")
    if not files and root is None:
        raise UsageError(
            f"no data: give --data_dir, --train_file/--validation_file or --dataset_name (or {DATA_DIR_ENV})"
        )
    paths = {"train": root / "train.txt", "validation": root / "valid.txt"} if not files else {}
    paths = paths or {"train": args.train_file, "validation": args.validation_file}
    for split in splits:
        if paths[split] is None or not Path(paths[split]).is_file():
            flag = f"--{split}_file"
            raise UsageError(f"{flag}: {paths[split]} is not a text file" if paths[split] else f"{flag} is needed")
    return {split: Path(paths[split]) for split in splits}


def read_texts(args: Any) -> dict[str, str]:
    """The text of each split :func:`text_source` names, as one string."""
    if "dataset" not in args.text:
        return {split: read_utf8(path) for split, path in args.text.items()}
    import datasets

    loaded, column, texts = datasets.load_dataset(args.dataset_name, args.dataset_config_name), args.text_column, {}
    for split in args.text["dataset"]:
        name = "test" if split == "validation" and "validation" not in loaded else split
        if name not in loaded or column not in loaded[name].column_names:
            raise UsageError(f"--dataset_name {args.dataset_name}: no {name!r} split with a {column!r} column")
        texts[split] = "".join(row if row.endswith("\n") else row + "\n" for row in loaded[name][column])
    return texts


def token_blocks(tokenizer: Any, texts: dict, split: str, block_size: int, max_tokens: int | None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the ``split`` text (no special tokens added) as ``(blocks, block_size)``."""
    ids = tokenizer(texts[split], add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < block_size:
        raise UsageError(f"the {split} text holds fewer than --block_size {block_size} tokens")
    return torch.tensor(ids[: len(ids) // block_size * block_size], dtype=torch.long).view(-1, block_size)


def causal_batch(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loaders' collate_fn: blocks as a causal-LM batch (``labels`` = ``input_ids``; the model shifts them)."""
    ids = torch.stack(blocks)
    return {"input_ids": ids, "labels": ids}


def _perplexities(evaluations: dict) -> dict:
    return {label: result["perplexity"] for label, result in evaluations.items()}


def _jsonable(args: argparse.Namespace) -> dict:
    skip = {"source", "source_record", "text", "hub_token"}
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
