"""One prepared check for a CUDA machine: HeLU kernel correctness, activation speed, BERT-base memory.

    python benchmarks/gpu_check.py            # CUDA; about 1-3 minutes on an H100/H200
    python benchmarks/gpu_check.py --smoke    # the same code paths on CPU with tiny sizes (seconds)

1. Correctness: hf_helu's default backend on this device (Triton on CUDA) against the torch
   reference, bit for bit (forward incl. -0.0 and NaN, mask bits, gradient), for float32, bfloat16
   and float16, odd sizes and non-contiguous inputs.
2. One activation of 32768x3072 bf16, forward+backward: time ratios to relu, gelu and the
   input-saving HeLU, and achieved GB/s (the bytes each one must move at least) against a plain
   copy's bandwidth on this card.
3. BERT-base (random init, 12 layers) training steps, batch 32, seq 128 and 512, bf16 autocast,
   AdamW: peak memory and median step time (CUDA events, >= 20 steps after warm-up) for relu,
   gelu, the input-saving HeLU and hf_helu.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import act_micro  # the activation timing shared with benchmarks/act_micro.py

import hf_helu
from hf_helu import ops

ALPHA = act_micro.ALPHA


# --- 1. correctness ---------------------------------------------------------------------------


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check_kernels(device: torch.device) -> list[str]:
    """Compare the backend "auto" picks on ``device`` with the torch backend, bit for bit."""
    failures = []
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([-0.0, 0.0, float("nan"), -float("nan"), float("inf"), float("-inf"), -ALPHA, ALPHA])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in [(1,), (7,), (4099,), (3, 5, 2049), (64, 3072)]:
            x = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
            x.view(-1)[: min(8, x.numel())] = special[: x.numel()].to(dtype)
            for name, t in (("contiguous", x), ("transposed", x.t() if x.dim() == 2 else x[..., ::2])):
                t = t.to(device)
                grad = torch.randn(t.shape, generator=gen).to(device=device, dtype=dtype)
                chosen = ops.resolve(t)
                y, mask = ops.forward(chosen, t, ALPHA)
                _, ref_keep = ops.forward("torch", t, ALPHA)
                label = f"{chosen} {dtype} {tuple(t.shape)} {name}"
                if not torch.equal(_int_view(y), _int_view(torch.relu(t))):
                    failures.append(f"{label}: forward differs from torch.relu bit for bit")
                if mask.dtype == torch.uint8:  # bit-packed: compare with the reference bits packed by NumPy
                    expected = np.packbits(ref_keep.cpu().numpy().ravel(), bitorder="little")
                    if not np.array_equal(mask.cpu().numpy(), expected):
                        failures.append(f"{label}: mask bits differ from the reference")
                grad_in = ops.backward(chosen, grad, mask, t.shape)
                expected_grad = torch.where(ref_keep, grad, torch.zeros((), dtype=dtype, device=device))
                if not torch.equal(_int_view(grad_in), _int_view(expected_grad)):
                    failures.append(f"{label}: gradient differs from the reference")
    return failures


# --- 2. activation speed ----------------------------------------------------------------------


def minimal_bytes(name: str, n: int, element: int) -> float:
    """Bytes an activation must move for forward+backward: relu/gelu/input-saving read x, write y,
    then read grad and one saved tensor and write grad_in; hf_helu's saved tensor is n/8 bytes."""
    if name.startswith("hf_helu"):
        return 4 * n * element + 2 * n / 8
    return 5 * n * element


def copy_bandwidth(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` (read n + write n elements): the card's practical ceiling."""
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            dst.copy_(src)
            times.append(time.perf_counter() - begin)
    return 2 * n * src.element_size() / statistics.median(times) / 1e9


def activation_table(device: torch.device, shape: tuple[int, ...], reps: int) -> str:
    dtype = torch.bfloat16
    n = int(np.prod(shape))
    rows = {row["activation"]: row for row in act_micro.bench(shape, device, dtype, reps, warmup=max(3, reps // 10))}
    copy = copy_bandwidth(device, n, dtype, reps)
    lines = [
        f"Activation {'x'.join(map(str, shape))} bf16, fwd+bwd, {reps} interleaved reps; copy {copy:.0f} GB/s",
        "",
        "| activation | ms | x relu | x gelu | x helu_saves_input | GB/s | % of copy | extra saved B/elem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        gbs = minimal_bytes(name, n, 2) / (row["ms"] / 1e3) / 1e9
        lines.append(
            f"| {name} | {row['ms']:.3f} | {row['ms'] / rows['relu']['ms']:.2f} | {row['ms'] / rows['gelu']['ms']:.2f} "
            f"| {row['ms'] / rows['helu_saves_input']['ms']:.2f} | {gbs:.0f} | {100 * gbs / copy:.0f}% "
            f"| {row['extra_bytes_per_elem']:.3g} |"
        )
    return "\n".join(lines)


# --- 3. BERT-base training step ---------------------------------------------------------------


class InputSavingHeLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_micro.InputSavingHeLU.apply(x)


def build_bert(activation: str, tiny: bool, device: torch.device) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    hidden_act = {"relu": "relu", "gelu": "gelu", "helu_saves_input": "relu", "hf_helu": hf_helu.activation_name(ALPHA)}
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
    sizes = sizes if tiny else {}
    config = BertConfig(hidden_act=hidden_act[activation], num_labels=2, **sizes)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device)
    if activation == "helu_saves_input":
        for layer in model.bert.encoder.layer:
            layer.intermediate.intermediate_act_fn = InputSavingHeLU()
    return model.train()


def bert_step_stats(activation: str, batch: int, seq: int, steps: int, warmup: int, device: torch.device, tiny: bool):
    """(peak memory GiB or None on CPU, median step ms) for one activation."""
    model = build_bert(activation, tiny, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return peak, statistics.median(times)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bert_table(device: torch.device, batch: int, seqs: list[int], steps: int, warmup: int, tiny: bool) -> str:
    names = ["relu", "gelu", "helu_saves_input", "hf_helu"]
    lines = [
        f"BERT-{'tiny' if tiny else 'base'} training step, batch {batch}, bf16 autocast, AdamW, "
        f"median of {steps} steps after {warmup} warm-up",
        "",
        "| seq | activation | peak GiB | vs relu | step ms | vs relu |",
        "|---|---|---|---|---|---|",
    ]
    for seq in seqs:
        stats = {}
        for name in names:
            stats[name] = bert_step_stats(name, batch, seq, steps, warmup, device, tiny)
            release_memory(device)
        base_peak, base_ms = stats["relu"]
        for name, (peak, ms) in stats.items():
            peak_text = "n/a (CPU)" if peak is None else f"{peak:.2f}"
            rel_peak = "n/a" if peak is None else f"{100 * (peak / base_peak - 1):+.1f}%"
            lines.append(f"| {seq} | {name} | {peak_text} | {rel_peak} | {ms:.1f} | {100 * (ms / base_ms - 1):+.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run every code path on CPU with tiny sizes")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    if args.smoke:
        device, shape, reps, batch, seqs, steps, warmup = torch.device("cpu"), (64, 96), 5, 2, [16, 32], 2, 1
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation on a loaded machine
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke to exercise the code paths on CPU")
        device, shape, reps, batch, seqs = torch.device("cuda"), (32768, 3072), 100, 32, [128, 512]
        steps, warmup = 20, 5
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"backend chosen on {device.type}: {ops.resolve(torch.empty(8, device=device, dtype=torch.bfloat16))}")

    failures = check_kernels(device)
    print("kernel correctness:", "OK (bit for bit)" if not failures else f"{len(failures)} FAILURES")
    for failure in failures[:20]:
        print("  ", failure)
    print()
    print(activation_table(device, shape, reps))
    print()
    print(bert_table(device, batch, seqs, steps, warmup, tiny=args.smoke))
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
