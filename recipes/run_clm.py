"""Fine-tune a causal LM with HeLU in its FFN blocks and measure its perplexity, with Accelerate.

    python recipes/run_clm.py --model SmolLM2-135M.gguf --activation helu --max_steps 200 --data_dir data/wikitext-2
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/run_clm.py ...   # or `accelerate launch`
    python recipes/run_clm.py --model runs/clm/model --eval_only --validation_file valid.txt

--model: a checkpoint folder, a hub id, or a .gguf file (or a folder holding one; dequantized to float32). Data:
--data_dir (train.txt/valid.txt; default $HF_HELU_DATA_DIR/wikitext-2), --train_file/--validation_file, or
--dataset_name (the hub). Perplexity = exp(mean token NLL) over contiguous --block_size blocks of the validation
text (the first --max_eval_tokens tokens), measured on the original checkpoint, after the activation swap and
conversion, and after fine-tuning, each with the FFN dead/zero-unit statistics.

Writes OUTPUT_DIR/results.json, OUTPUT_DIR/model and, with HeLU, OUTPUT_DIR/model_relu (stock ReLU, loads and
generates without hf_helu; --check_export checks its greedy tokens equal the HeLU model's). --eval_only writes
OUTPUT_DIR/eval_results.json. Checkpoints: OUTPUT_DIR/checkpoints/checkpoint_<i> (accelerate's automatic naming);
--resume_from_checkpoint latest continues the newest complete one (the swap and conversion are redone, then the
checkpoint's weights replace theirs).

A GGUF checkpoint saves as an unquantized float32 model: the recipe clears transformers' gguf quantizer record after
loading (hf_helu's own GGUF support may take this over).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from recipe_support import clm
from recipe_support.output_dir import claim_output_dir
from recipe_support.results import MODEL_DIR, relu_export_dir, results_file, save_model, write_results
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import hf_helu
from hf_helu.conversion import CONVERSION_CHOICES, DEFAULT_ANNEAL_FRACTION, DEFAULT_RIDGE, resolve_conversion
from hf_helu.diagnostics import decode_sparsity
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, fraction, positive_int

DECODE_PROMPTS, DECODE_NEW_TOKENS = 4, 32
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "custom_checkpoint_0.pkl"  # the TrainState, registered first; written last, so a kill leaves none
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Checkpoint folder, hub id, .gguf file or folder with one.")
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
    model = parser.add_argument_group("activation and conversion")
    model.add_argument("--activation", choices=("keep", "relu", "helu"), default="keep")
    model.add_argument("--alpha", type=alpha, default=hf_helu.DEFAULT_ALPHA, help="HeLU margin.")
    model.add_argument("--conversion", choices=CONVERSION_CHOICES, default="auto", help="hf_helu.convert_model method.")
    model.add_argument("--calibration_blocks", type=positive_int, default=16, help="Training blocks to calibrate on.")
    model.add_argument("--calibration_ridge", type=float, default=DEFAULT_RIDGE)
    model.add_argument("--anneal_fraction", type=float, default=DEFAULT_ANNEAL_FRACTION)
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=None, help="Default: runs/clm_<activation>_s<seed>.")
    train.add_argument("--overwrite_output_dir", action="store_true", help="Remove an earlier run's files first.")
    train.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    train.add_argument("--checkpointing_steps", type=positive_int, default=100, help="Checkpoint every N steps.")
    train.add_argument("--save_total_limit", type=positive_int, default=2, help="Keep the newest N checkpoints.")
    train.add_argument("--epochs", type=positive_int, default=1)
    train.add_argument("--max_steps", type=positive_int, default=None, help="Stop after N optimizer steps.")
    train.add_argument("--lr", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--warmup_ratio", type=fraction, default=0.0)
    train.add_argument("--batch_size", type=positive_int, default=8, help="Blocks per process and step.")
    train.add_argument("--eval_batch_size", type=positive_int, default=None, help="Default: --batch_size.")
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="0: no clipping.")
    train.add_argument(
        "--sparsity_penalty", type=float, default=0.0, help="Weight of hf_helu.ActivationSparsityPenalty (0: off)."
    )
    train.add_argument("--sparsity_warmup_steps", type=int, default=0, help="Steps over which the penalty ramps up.")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--eval_only", action="store_true", help="Only measure perplexity (eval_results.json).")
    train.add_argument("--check_export", action="store_true", help="Check model_relu generates as the HeLU model.")
    train.add_argument("--export_prompts", type=positive_int, default=4, help="Prompts for --check_export.")
    train.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every combination of flags that cannot work, refused with a UsageError before anything is loaded."""
    if args.block_size < 2:
        raise UsageError(f"--block_size {args.block_size}: a block needs at least 2 tokens (one to predict)")
    if args.activation == "keep" and args.conversion not in ("auto", "none"):
        raise UsageError(f"--conversion {args.conversion} converts to relu/helu: give --activation relu or helu")
    if not 0 < args.anneal_fraction <= 1:
        raise UsageError(f"--anneal_fraction must be in (0, 1], got {args.anneal_fraction}")
    if args.calibration_ridge < 0 or not math.isfinite(args.calibration_ridge):
        raise UsageError(f"--calibration_ridge must be a finite number >= 0, got {args.calibration_ridge}")
    if not math.isfinite(args.sparsity_penalty) or args.sparsity_penalty < 0:
        raise UsageError(f"--sparsity_penalty must be a finite number >= 0 (0: off), got {args.sparsity_penalty}")
    if args.sparsity_warmup_steps < 0:
        raise UsageError(f"--sparsity_warmup_steps must be >= 0, got {args.sparsity_warmup_steps}")
    if args.eval_only and args.sparsity_penalty:
        raise UsageError("--eval_only does not train: drop --sparsity_penalty")
    if args.eval_only and args.resume_from_checkpoint:
        raise UsageError("--eval_only does not train: drop --resume_from_checkpoint")
    if args.eval_only and "anneal" in args.conversion:
        raise UsageError(f"--conversion {args.conversion} anneals during training: not with --eval_only")
    if args.check_export and args.activation != "helu":
        raise UsageError("--check_export checks the stock-ReLU export of a HeLU model: give --activation helu")
    args.source = clm.model_source(args.model)
    args.text = clm.text_source(args)
    args.output_dir = Path(args.output_dir or f"runs/clm_{args.activation}_s{args.seed}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), automatic_checkpoint_naming=True, total_limit=args.save_total_limit
        ),
    )
    # The output folder (writable, locked, no other run's files) is claimed before any data or model is loaded.
    with claim_output_dir(accelerator, args, inputs=[args.model]):
        if args.resume_from_checkpoint:
            find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        results = run(args, accelerator)
    accelerator.end_training()
    return results


def run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    set_seed(args.seed)
    results: dict[str, Any] = {
        "status": "running",
        "config": _jsonable(args),
        "num_processes": accelerator.num_processes,
    }

    # Model (float32; a GGUF checkpoint dequantized) and data: contiguous token blocks of the text.
    model, tokenizer = clm.load_causal_lm(args.source)
    texts = clm.read_texts(args.text, with_train=clm.needs_training_text(args))
    eval_blocks = clm.token_blocks(tokenizer, texts["validation"], args.block_size, args.max_eval_tokens)
    if len(eval_blocks) == 0:
        raise UsageError(f"the validation text holds fewer than --block_size {args.block_size} tokens")
    eval_batch_size = args.eval_batch_size or args.batch_size
    eval_dataloader = accelerator.prepare(DataLoader(clm.BlockDataset(eval_blocks), batch_size=eval_batch_size))
    train_dataloader = None
    if "train" in texts:
        train_blocks = clm.token_blocks(tokenizer, texts["train"], args.block_size, args.max_train_tokens)
        if len(train_blocks) == 0:
            raise UsageError(f"the training text holds fewer than --block_size {args.block_size} tokens")
        generator = torch.Generator().manual_seed(args.seed)
        train_dataloader = DataLoader(
            clm.BlockDataset(train_blocks), batch_size=args.batch_size, shuffle=True, generator=generator
        )

    # The checkpoint as it is, then with its FFN activation swapped (and converted).
    model.to(accelerator.device)
    evaluations = {"original": evaluate(accelerator, model, eval_dataloader, "original")}
    total_steps = None if args.eval_only else _total_steps(args, train_dataloader, accelerator.num_processes)
    converted = convert(args, accelerator, model, train_dataloader, total_steps)
    results["model"] = {"source": args.source.location, "gguf_file": args.source.gguf_file, **converted.info}
    if args.activation != "keep":
        evaluations["converted"] = evaluate(accelerator, model, eval_dataloader, "converted")

    if args.eval_only:
        results.update(status="complete", evaluations=evaluations, perplexity=_perplexities(evaluations))
        write_results(accelerator, args.output_dir, results, results_file(eval_only=True))
        return results

    model, train_info = train(args, accelerator, model, train_dataloader, total_steps, converted.annealer, results)
    evaluations["final"] = evaluate(accelerator, model, eval_dataloader, "final")
    results.update(evaluations=evaluations, perplexity=_perplexities(evaluations), train=train_info)

    # The final model, its stock-ReLU export (HeLU), and the export's greedy generation without hf_helu.
    model_dir = args.output_dir / MODEL_DIR
    exported = save_model(accelerator, model, model_dir, tokenizer)
    results.update(model_dir=str(model_dir), relu_export_dir=str(exported) if exported else None)
    if accelerator.is_main_process:  # FFN zeros while decoding greedily at batch 1: what sparse_inference skips
        prompts = eval_blocks[:DECODE_PROMPTS, : min(16, args.block_size)]
        results["decode_sparsity"] = decode_sparsity(accelerator.unwrap_model(model), prompts, DECODE_NEW_TOKENS)
    if args.check_export and accelerator.is_main_process:
        prompts = eval_blocks[: args.export_prompts, : min(16, args.block_size)]
        check = clm.check_export_generation(relu_export_dir(model_dir), accelerator.unwrap_model(model), prompts)
        results["export_check"] = check
        accelerator.print(f"export check: greedy tokens identical without hf_helu: {check['identical']}")
    results["status"] = "complete"
    write_results(accelerator, args.output_dir, results, results_file(eval_only=False))
    accelerator.print(f"results: {args.output_dir / results_file(False)}")
    return results


def evaluate(accelerator: Accelerator, model, eval_dataloader, label: str) -> dict:
    """Perplexity and FFN statistics of ``model`` now, printed with ``label``."""
    result = clm.evaluate(accelerator, model, eval_dataloader)
    ffn = result["ffn"]
    accelerator.print(
        f"[{label}] perplexity {result['perplexity']:.4g} over {result['tokens']} tokens; FFN zeros "
        f"{100 * (ffn['zero_fraction'] or 0):.1f}%, dead units {ffn['dead_units']}/{ffn['units']}"
    )
    return result


class Converted:
    """What :func:`convert` did: ``info`` for results.json, the annealer to drive (or None)."""

    def __init__(self, info: dict, annealer: Any = None):
        self.info, self.annealer = info, annealer


def convert(args, accelerator: Accelerator, model, train_dataloader, total_steps: int | None) -> Converted:
    """``--activation`` relu/helu into the FFN blocks through ``hf_helu.convert_model`` (``--conversion``)."""
    if args.activation == "keep":
        return Converted({"activation": "keep"})
    choice = resolve_conversion(args.conversion, activation=args.activation, model=model, training=not args.eval_only)
    calibration = None
    if "calibrate" in choice.method:
        blocks = train_dataloader.dataset.blocks[: args.calibration_blocks]
        calibration = [{"input_ids": b.to(accelerator.device)} for b in blocks.split(args.batch_size)]
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
    return Converted(info | {"conversion": result.to_dict()}, result.annealer)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class TrainState:
    """The loop's counters, saved in every checkpoint (registered for checkpointing first: custom_checkpoint_0)."""

    def __init__(self) -> None:
        self.completed_steps = self.epoch = self.batches_in_epoch = self.train_tokens = 0
        self.loss_sum, self.loss_count, self.wall_time_s = 0.0, 0, 0.0
        self.penalty_sum = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def train(args, accelerator: Accelerator, model, train_dataloader, total_steps: int, annealer, results: dict):
    """The training loop (accelerate's nlp_example, plus resume and checkpoints). Returns the prepared model and
    the training summary."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    penalty = hf_helu.ActivationSparsityPenalty(model, args.sparsity_penalty, warmup_steps=args.sparsity_warmup_steps)
    # The prepared scheduler steps once per process per optimizer step: schedule over all of them.
    schedule = total_steps * accelerator.num_processes
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * schedule), schedule)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if args.resume_from_checkpoint:
        results["resumed_from"] = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    start = time.perf_counter() - state.wall_time_s
    progress = tqdm(
        total=total_steps,
        initial=state.completed_steps,
        disable=args.no_progress or not accelerator.is_local_main_process,
    )
    if annealer is not None:
        annealer.on_step(state.completed_steps, total_steps)
    penalty.completed_steps = state.completed_steps
    for epoch in range(state.epoch, args.epochs):
        if state.completed_steps >= total_steps:
            break
        model.train()
        skip = state.batches_in_epoch
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        batches.set_epoch(epoch)  # the seedable sampler's order depends on seed + epoch only
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                penalty_term = penalty.loss()  # a constant 0 with --sparsity_penalty 0
                accelerator.backward(loss + penalty_term)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            state.train_tokens += batch["input_ids"].numel() * accelerator.num_processes
            state.loss_sum, state.loss_count = state.loss_sum + loss.item(), state.loss_count + 1
            state.penalty_sum += penalty_term.item()
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress.update(1)
            penalty.step()
            if annealer is not None:
                annealer.on_step(state.completed_steps, total_steps)
            if state.completed_steps % args.checkpointing_steps == 0 or state.completed_steps >= total_steps:
                state.wall_time_s = time.perf_counter() - start
                save_checkpoint(accelerator, state)
            if state.completed_steps >= total_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
    progress.close()
    penalty.remove()
    wall = time.perf_counter() - start
    count = max(state.loss_count, 1)
    losses = torch.tensor([state.loss_sum / count, state.penalty_sum / count], device=accelerator.device)
    loss, penalty_mean = accelerator.reduce(losses, reduction="mean").tolist()
    accelerator.print(f"train loss {loss:.4f} (language model), sparsity penalty {penalty_mean:.4g} (mean term)")
    summary = {
        "completed_steps": state.completed_steps,
        "train_loss": loss,
        "sparsity_penalty": penalty_mean,
        "train_tokens": state.train_tokens,
        "wall_time_s": wall,
        "train_tokens_per_s": state.train_tokens / wall if wall > 0 else None,
    }
    return model, summary


def save_checkpoint(accelerator: Accelerator, state: TrainState) -> None:
    """``accelerator.save_state()``: the next OUTPUT_DIR/checkpoints/checkpoint_<i> (the newest N kept)."""
    accelerator.save_state()


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS_DIR
    found = (
        [p for p in root.iterdir() if _CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file()] if root.is_dir() else []
    )
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """``--resume_from_checkpoint``: a checkpoint folder, or "latest" (the newest complete one in OUTPUT_DIR)."""
    if which == "latest":
        complete = _complete_checkpoints(output_dir)
        if not complete:
            raise UsageError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir / CHECKPOINTS_DIR}"
            )
        return complete[-1]
    if not (Path(which) / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {which}: not a checkpoint folder of this recipe (no {STATE_FILE})")
    return Path(which)


def resume(accelerator: Accelerator, output_dir: Path, which: str) -> str:
    """Load the checkpoint (model, optimizer, scheduler, RNG, TrainState); later saves number on after the newest.

    Checkpoint folders a kill left incomplete are removed first.
    """
    path = find_checkpoint(output_dir, which).resolve()
    complete = _complete_checkpoints(output_dir)
    if accelerator.is_main_process:
        for partial in set((output_dir / CHECKPOINTS_DIR).iterdir()) - set(complete):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    accelerator.wait_for_everyone()
    accelerator.load_state(str(path))
    accelerator.project_configuration.iteration = int(_CHECKPOINT.match(complete[-1].name).group(1)) + 1
    accelerator.print(f"resumed from {path}")
    return str(path)


def _total_steps(args, train_dataloader: DataLoader, num_processes: int) -> int:
    """Optimizer steps each process runs (the un-prepared dataloader's length; a prepared one is sharded)."""
    per_process = math.ceil(len(train_dataloader) / num_processes)
    total = args.epochs * math.ceil(per_process / args.gradient_accumulation_steps)
    return total if args.max_steps is None else min(total, args.max_steps)


def _perplexities(evaluations: dict) -> dict:
    return {label: result["perplexity"] for label, result in evaluations.items()}


def _jsonable(args: argparse.Namespace) -> dict:
    skip = {"source", "text"}
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
