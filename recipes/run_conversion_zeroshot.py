"""Zero-shot probe of conversion quality: STS-B Spearman of mean-pooled sentence embeddings, no fine-tuning.

Compares the pretrained encoder with its original FFN activation, the naive swap to ReLU/HeLU, and the
swap followed by calibration (:func:`hf_helu.conversion.calibrate_ffn`) on unlabeled STS-B training
sentences, for each ridge given. Cheap (forward passes only) and a direct measure of what the swap
costs before fine-tuning starts.

    python recipes/run_conversion_zeroshot.py --data_dir ../shared/data/glue --output runs/zeroshot.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from recipe_support import glue
from recipe_support.paths import DATA_DIR_ENV, data_path
from transformers import AutoModel, AutoTokenizer

import hf_helu  # noqa: F401  (registers "helu")
from hf_helu import conversion
from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.atomic import atomic_write_json, atomic_write_text
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, positive_int
from hf_helu.patching import patch_model


def read_stsb(path: Path, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Sentence pairs and gold scores of an STS-B TSV (the first ``limit`` rows, or all)."""
    if not path.is_file():
        raise UsageError(f"STS-B file not found: {path}")
    columns = glue.read_tsv(glue.get_task("stsb"), path)
    end = limit or None
    return columns["sentence1"][:end], columns["sentence2"][:end], np.array(columns["label"][:end], dtype=np.float64)


def embed(model, batches) -> torch.Tensor:
    """Mean of the last hidden states over the real tokens (all-MiniLM-L6-v2's own pooling)."""
    pooled = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(pooled)


def spearman(model, tokenizer, first: list[str], second: list[str], gold: np.ndarray, batch_size: int) -> float:
    def encode(texts):
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        batches = [dict(tokenizer(c, padding=True, truncation=True, return_tensors="pt")) for c in chunks]
        return embed(model, batches)

    cosine = torch.nn.functional.cosine_similarity(encode(first), encode(second)).numpy()
    return float(scipy.stats.spearmanr(cosine, gold).statistic)


def _checkpoint(item: str) -> tuple[str, str]:
    """``--checkpoints NAME=PATH`` as (name, path), the path an existing folder."""
    name, sep, path = item.partition("=")
    if not sep or not name or not Path(path).is_dir():
        raise UsageError(f"--checkpoints expects NAME=PATH with an existing folder, got {item!r}")
    return name, path


def read_data(args: argparse.Namespace) -> tuple[tuple, list[str]]:
    """(STS-B dev pairs and scores, the calibration sentences: both sentences of the first train pairs)."""
    data_dir = Path(args.data_dir) if args.data_dir else data_path("glue")
    if data_dir is None:
        raise UsageError(f"no GLUE folder: pass --data_dir, or set ${DATA_DIR_ENV} to a folder holding glue/")
    dev = read_stsb(data_dir / "STS-B" / "dev.tsv", args.max_eval_pairs)
    train_first, train_second, _ = read_stsb(data_dir / "STS-B" / "train.tsv", args.calibration_pairs)
    return dev, train_first + train_second


def check_output(output: Path) -> None:
    """``--output``'s folder exists (or can be made) and takes a new file; ``--output`` is not a folder."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder; give a .json file name")
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".probe."):
            pass
    except OSError as error:
        raise UsageError(f"--output {output}: its folder is not writable ({error.strerror or error})") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: the packaged all-MiniLM-L6-v2.")
    parser.add_argument("--data_dir", default=None, help="Folder with STS-B/{train,dev}.tsv (GLUE layout).")
    parser.add_argument("--calibration_pairs", type=int, default=400, help="STS-B train pairs (2 sentences each).")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--alpha", type=alpha, default=DEFAULT_ALPHA)
    parser.add_argument("--max_eval_pairs", type=int, default=None, help="Default: the whole dev set (1,500).")
    parser.add_argument("--per_device_eval_batch_size", type=positive_int, default=64)
    parser.add_argument(
        "--checkpoints",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="Also score the encoders of these saved models (e.g. after fine-tuning); skips the probe itself "
        "when --skip_probe is given.",
    )
    parser.add_argument("--skip_probe", action="store_true", help="Only score --checkpoints.")
    parser.add_argument("--output", default="runs/conversion_zeroshot.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Every flag, the output folder and the data are checked before any model loads.
    checkpoints = [_checkpoint(item) for item in args.checkpoints]
    for ridge in args.ridges:
        if not 0 <= ridge < math.inf:
            raise UsageError(f"--ridges must be finite numbers >= 0, got {ridge}")
    output = Path(args.output)
    check_output(output)
    dev, calibration_texts = read_data(args)

    model_path = args.model_name_or_path or glue.default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()

    rows = []

    def record(name: str, model, **extra) -> None:
        start = time.perf_counter()
        score = spearman(model, tokenizer, *dev, args.per_device_eval_batch_size)
        rows.append({"model": name, "stsb_dev_spearman": score, "eval_s": time.perf_counter() - start, **extra})
        print(f"{name:<40} Spearman {score:.4f}", flush=True)

    for name, path in checkpoints:
        record(name, AutoModel.from_pretrained(path, dtype=torch.float32).eval(), checkpoint=path)
    if args.skip_probe:
        args.ridges = []
    else:
        record("original activation", original)
        naive = copy.deepcopy(original)
        patch_model(naive, alpha=args.alpha)
        record("naive swap to ReLU/HeLU", naive)
    for ridge in args.ridges:
        calibrated = copy.deepcopy(original)
        batches = conversion.calibration_batches(
            tokenizer, calibration_texts, batch_size=args.per_device_eval_batch_size
        )
        start = time.perf_counter()
        result = conversion.convert_model(
            calibrated, "calibrate", alpha=args.alpha, calibration_batches=batches, ridge=ridge
        )
        seconds = time.perf_counter() - start
        print(result.calibration, flush=True)
        record(
            f"calibrated (ridge {ridge:g})",
            calibrated,
            calibration_s=seconds,
            calibration=result.calibration.to_dict(),
        )

    summary = {
        "model": str(model_path),
        "calibration_sentences": len(calibration_texts),
        "eval_pairs": len(dev[2]),
        "alpha": args.alpha,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    atomic_write_json(output, summary)
    table = ["| model | STS-B dev Spearman (zero-shot) | calibration s |", "|---|---|---|"]
    for row in rows:
        seconds = f"{row['calibration_s']:.1f}" if "calibration_s" in row else ""
        table.append(f"| {row['model']} | {100 * row['stsb_dev_spearman']:.1f} | {seconds} |")
    atomic_write_text(output.with_suffix(".md"), "\n".join(table) + "\n")
    print("\n".join(table))
    return summary


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
