"""Can the exported ReLU model's FFN zeros save time at batch 1 on this CPU? The output projection, four ways.

On the real FFN activations of one batch (captured at each layer's output projection input), per layer:

* ``dense``: ``F.linear(a, W2, b)``, what stock PyTorch runs;
* ``union columns``: only the units active in at least one token of the batch (``index_select`` of W2's
  columns once per layer; at batch 1 the union is over the sequence's tokens);
* ``per-token columns``: each token over its own active units (``index_select`` of W2's columns per token);
* ``CSR``: ``torch.sparse.mm`` of the activations as a CSR matrix (conversion included) with W2^T.

Every path is checked against ``dense`` (max abs difference) before it is timed; the timings are interleaved.
Used by ``benchmarks/inference.py`` (its section "Sparsity at batch 1").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hf_helu.capture import ForwardCapture, submodules
from hf_helu.families import find_activation_sites

Projection = Callable[[torch.Tensor, nn.Linear], torch.Tensor]


def dense(a: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return F.linear(a, linear.weight, linear.bias)


def union_columns(a: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    active = (a != 0).any(dim=0).nonzero().squeeze(1)
    return F.linear(a.index_select(1, active), linear.weight.index_select(1, active), linear.bias)


def per_token_columns(a: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    rows = []
    for token in a:
        active = token.nonzero().squeeze(1)
        rows.append(torch.mv(linear.weight.index_select(1, active), token.index_select(0, active)))
    return torch.stack(rows) + linear.bias


def csr(a: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return torch.sparse.mm(a.to_sparse_csr(), linear.weight.t()) + linear.bias


PATHS: dict[str, Projection] = {
    "dense": dense,
    "union columns": union_columns,
    "per-token columns": per_token_columns,
    "CSR": csr,
}


def ffn_projection_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, nn.Linear]]:
    """Per FFN layer: the (tokens x intermediate) activations its output projection consumed, and that projection."""
    names = [site.output_projection for site in find_activation_sites(model)]
    modules = submodules(model, names)
    with ForwardCapture(modules, record="input") as capture, torch.inference_mode():
        model(**batch)
        records = {name: capture.records[name] for name in names}
    return [(records[name].reshape(-1, records[name].shape[-1]).clone(), modules[name]) for name in names]


def time_paths(layers: list[tuple[torch.Tensor, nn.Linear]], repeats: int) -> dict:
    """Per path: CPU seconds of all layers' projections per repetition, the max abs error, the zero/union shares."""
    with torch.inference_mode():
        errors = {
            name: max(float((path(a, lin) - dense(a, lin)).abs().max()) for a, lin in layers)
            for name, path in PATHS.items()
        }
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        order = list(PATHS)
        for rep in range(repeats + 1):  # the first repetition is a warm-up
            for name in order if rep % 2 == 0 else order[::-1]:
                start = time.process_time()
                for a, lin in layers:
                    PATHS[name](a, lin)
                if rep:
                    times[name].append(time.process_time() - start)
    zeros = statistics.fmean(float((a == 0).float().mean()) for a, _ in layers)
    union = statistics.fmean(float((a != 0).any(dim=0).float().mean()) for a, _ in layers)
    return {"times": times, "errors": errors, "zero_share": zeros, "union_share": union}


def markdown(result: dict, tokens: int, threads: int) -> list[str]:
    times = result["times"]
    base = times["dense"]
    lines = [
        f"### Sparsity at batch 1: the FFN output projection over active units only ({tokens} tokens, "
        f"{threads} thread(s))",
        "",
        f"Zeros in the projection's input: {100 * result['zero_share']:.1f}%; units active in at least one token "
        f"(the union): {100 * result['union_share']:.1f}%. CPU time of all layers' output projections, median of "
        f"{len(base)} interleaved reps; ratio = median of per-rep ratios to dense.",
        "",
        "| path | median (ms) | ratio to dense | max abs diff to dense |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        ratio = statistics.median(v / d for v, d in zip(values, base, strict=True))
        lines.append(f"| {name} | {statistics.median(values) * 1e3:.2f} | {ratio:.2f} | {result['errors'][name]:.2g} |")
    return lines
