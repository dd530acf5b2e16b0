"""Calibration time against depth on a tiny random LLaMA: sequential (cached hidden states) vs re-running the model.

    python benchmarks/calibration_depth.py [--layers 4 16] [--threads 2]

Prints, per strategy, the seconds for each depth and the ratio deepest / shallowest (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaModel

from hf_helu import conversion
from hf_helu.patching import patch_model


def tiny_llama(layers: int) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
    )
    return LlamaModel(config).eval()


def seconds(model: LlamaModel, batches: list[dict], strategy: str, repeats: int) -> float:
    """The fastest of ``repeats`` calibrations (the machine is shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        patched = copy.deepcopy(model)
        original = conversion.original_activations(patched)
        patch_model(patched)
        start = time.perf_counter()
        conversion.calibrate_ffn(patched, batches, original, strategy=strategy)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="batches of 4 x 128 tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 128), generator=generator)} for _ in range(args.batches)]
    for strategy in ("sequential", "rerun"):
        times = [seconds(tiny_llama(layers), batches, strategy, args.repeats) for layers in args.layers]
        cells = "  ".join(f"{layers} layers {t:.2f} s" for layers, t in zip(args.layers, times, strict=True))
        print(f"{strategy:<10}  {cells}  ratio {times[-1] / times[0]:.1f}x")


if __name__ == "__main__":
    main()
