"""Forward+backward time of one large activation: relu, gelu, a HeLU that saves its input, hf_helu.

    python benchmarks/act_micro.py                      # CPU, and CUDA when present
    python benchmarks/act_micro.py --sizes 2048x512 --dtype bfloat16 --reps 200
    python benchmarks/act_micro.py --device cpu --threads 2 --loads idle torch2   # also beside a torch job

Repetitions are interleaved (each rep runs every activation once, in rotating order) so load
changes on a shared machine hit all of them alike; the ratio to relu is the median of the per-rep
ratios. "saved B/elem" counts what the autograd graph keeps for backward (measured with
``saved_tensors_hooks``); "extra" leaves out the output itself, which the next layer keeps anyway.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from neighbour import LOADS, load

from hf_helu import helu, ops

ALPHA = 0.05


class InputSavingHeLU(torch.autograd.Function):
    """The straightforward HeLU: save the float input, recompute the mask in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > -ALPHA)


def activations(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every activation to time on ``device``: the baselines, then each hf_helu backend that runs there."""
    acts = {"relu": torch.relu, "gelu": F.gelu, "helu_saves_input": InputSavingHeLU.apply}
    probe = torch.empty(8, device=device, dtype=dtype)
    for name, backend in ops.BACKENDS.items():
        if backend.supports(probe):
            acts[f"hf_helu[{name}]"] = lambda x, name=name: helu(x, ALPHA, backend=name)
    return acts


def saved_bytes(act: Callable, x: torch.Tensor) -> tuple[int, int]:
    """Bytes the autograd graph saves for backward: all of them, and those not in the output's storage."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = act(x)
    total = sum(t.numel() * t.element_size() for t in saved)
    extra = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() != y.data_ptr())
    return total, extra


def time_once(act: Callable, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward+backward (CUDA: measured with events)."""
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(act(x), x, grad)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    torch.autograd.grad(act(x), x, grad)
    return time.perf_counter() - begin


def bench(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> list[dict]:
    """One row per activation: median ms, median ratio to relu, saved bytes per element."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    acts = activations(device, dtype)
    names = list(acts)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            seconds = time_once(acts[name], x, grad)
            if rep >= warmup:
                times[name].append(seconds)
    rows = []
    for name in names:
        total, extra = saved_bytes(acts[name], x)
        ratios = [t / r for t, r in zip(times[name], times["relu"], strict=True)]
        rows.append(
            {
                "activation": name,
                "ms": statistics.median(times[name]) * 1e3,
                "ratio_to_relu": statistics.median(ratios),
                "saved_bytes_per_elem": total / x.numel(),
                "extra_bytes_per_elem": extra / x.numel(),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| activation | fwd+bwd ms (median) | x relu (median of ratios) | saved B/elem | extra B/elem |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['activation']} | {row['ms']:.3f} | {row['ratio_to_relu']:.2f} | "
            f"{row['saved_bytes_per_elem']:.3g} | {row['extra_bytes_per_elem']:.3g} |"
        )
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 2048x512") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must have positive dimensions")
    return shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_shape, default=[(2048, 512), (4096, 3072)])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions (default 100)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=["idle"], help="CPU: idle, torch2")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    dtype = getattr(torch, args.dtype)
    for device in devices:
        for kind in args.loads if device.type == "cpu" else ["idle"]:
            for shape in args.sizes:
                threads = f"cpu, {torch.get_num_threads()} threads"
                where = torch.cuda.get_device_name() if device.type == "cuda" else threads
                print(f"\n### {'x'.join(map(str, shape))} {args.dtype} on {where}, {LOADS[kind]}, {args.reps} reps\n")
                with load(kind):
                    print(format_table(bench(shape, device, dtype, args.reps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
