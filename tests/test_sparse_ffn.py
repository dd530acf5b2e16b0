"""hf_helu.sparse_inference: the sparse FFN matches the dense model, is reversible, and refuses bad use early.

Tolerance, argued: the sparse path adds the same non-zero products as the dense one in another order and skips
exact zeros only (a unit whose gate rounds to a different sign contributes |gate| of rounding size). Both fp32
results are then within fp32 rounding of the exact value, with constants that depend on the order only, so we
compare each against a float64 run of the same model: the sparse error may not exceed a few times the dense
error (plus a few fp32 ulps of the values). No order of summation is assumed.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sparse_helpers import PROMPTS, bert, build, gpt2, greedy, llama, whisper
from torch import nn

import hf_helu
from hf_helu.errors import UsageError
from hf_helu.ops import c_library
from hf_helu.sparse import kernel as sparse_kernel
from hf_helu.sparse.modules import PROBE_EVERY, GatedSparseFFN, PlainSparseFFN, torch_sparse_ffn

kernel = pytest.mark.skipif(not sparse_kernel.available(), reason="no C compiler for the sparse FFN kernel")
EPS32 = torch.finfo(torch.float32).eps


@kernel
@pytest.mark.parametrize("factory", [llama, gpt2, lambda: llama("helu")], ids=["llama", "gpt2", "llama-helu"])
@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_greedy_tokens_identical_to_dense(factory, mode):
    model = build(factory)
    dense = [greedy(model, ids) for ids in PROMPTS]
    handle = hf_helu.sparse_inference(model, mode=mode)
    sparse = [greedy(model, ids) for ids in PROMPTS]
    assert handle.sparse_calls > 0
    if mode == "auto":  # prefill (several rows) runs dense, decode steps (one row) sparse
        assert handle.dense_calls > 0
    handle.remove()
    for a, b in zip(dense, sparse, strict=True):
        assert torch.equal(a, b)


@kernel
def test_sampling_with_kv_cache_matches_dense():
    model = build(llama)
    ids = PROMPTS[0]

    def sample():
        torch.manual_seed(3)
        return greedy(model, ids, n=10, do_sample=True, top_k=5)

    dense = sample()
    with_cache = hf_helu.sparse_inference(model, mode="sparse")
    assert torch.equal(sample(), dense)
    with_cache.remove()


@kernel
def test_whisper_decoder_tokens_identical():
    model = build(whisper)
    torch.manual_seed(1)
    features = torch.randn(2, 16, 40)
    with torch.no_grad():
        dense = model.generate(features, max_new_tokens=8, min_new_tokens=8)
        handle = hf_helu.sparse_inference(model, mode="sparse")
        sparse = model.generate(features, max_new_tokens=8, min_new_tokens=8)
    assert len(handle.blocks) == 4 and handle.sparse_calls > 0
    handle.remove()
    assert torch.equal(dense, sparse)


def _hidden(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    names = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
    return [h.double() for name in names for h in (getattr(out, name, None) or ())]


HIDDEN_CASES = {
    "llama": (llama, lambda: {"input_ids": torch.tensor([[5, 17, 42]])}),
    "gpt2": (gpt2, lambda: {"input_ids": torch.tensor([[5, 17, 42]])}),
    "bert": (bert, lambda: {"input_ids": torch.tensor([[5, 17, 42, 9, 77]])}),
    "whisper": (
        whisper,
        lambda: {"input_features": torch.randn(1, 16, 40), "decoder_input_ids": torch.tensor([[1, 9, 33]])},
    ),
}


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("case", list(HIDDEN_CASES))
def test_hidden_states_within_rounding(case, backend, monkeypatch):
    if backend == "kernel" and not sparse_kernel.available():
        pytest.skip("no C compiler")
    if backend == "torch":
        monkeypatch.setattr(sparse_kernel, "available", lambda: False)
    factory, make_inputs = HIDDEN_CASES[case]
    model = build(factory)
    torch.manual_seed(2)
    inputs = make_inputs()
    exact = _hidden(
        copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    )
    dense = _hidden(model, inputs)
    handle = hf_helu.sparse_inference(model, mode="sparse")
    sparse = _hidden(model, inputs)
    assert handle.sparse_calls > 0
    handle.remove()
    for e, d, s in zip(exact, dense, sparse, strict=True):
        dense_error = (d - e).abs().max().item()
        allowed = 4 * dense_error + 16 * EPS32 * e.abs().max().item()
        assert (s - e).abs().max().item() <= allowed


def _outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs, output_hidden_states=True)
    names = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
    hidden = [h for name in names for h in (getattr(out, name, None) or ())]
    sum(h.square().sum() for h in hidden).backward()
    return [h.detach() for h in hidden] + [p.grad for p in model.parameters() if p.grad is not None]


def _first_projection(module):
    return module.gate_proj if isinstance(module, GatedSparseFFN) else module.original[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within fp32 rounding of the values (the swapped weights are read in another memory layout)."""
    return bool(((a - b).abs() <= 2e-4 * b.abs().max() + 1e-8).all())  # + 1e-8: grads that are 0 up to rounding


@pytest.mark.parametrize("case", list(HIDDEN_CASES))
def test_auto_dense_path_is_the_original_computation(case):
    """Calls of several rows run dense in "auto" mode: the original computation without autograd and, under
    autograd, the original modules' (bert and whisper use HeLU, whose backward differs from torch.relu's: the
    gradients would differ far beyond rounding if the bare ops ran there)."""
    factory, make_inputs = HIDDEN_CASES[case]
    model = build(factory)
    torch.manual_seed(2)
    inputs = make_inputs()
    dense = _hidden(model, inputs)
    dense_grads = _outputs_and_grads(model, inputs)
    handle = hf_helu.sparse_inference(model)
    swapped = _hidden(model, inputs)
    assert handle.sparse_calls == 0 and handle.dense_calls == len(handle.blocks)
    swapped_grads = _outputs_and_grads(model, inputs)
    handle.remove()
    assert len(dense) == len(swapped) > 0 and all(_close(a, b) for a, b in zip(dense, swapped, strict=True))
    assert len(dense_grads) == len(swapped_grads) > len(dense)
    assert all(_close(a, b) for a, b in zip(dense_grads, swapped_grads, strict=True))


@pytest.mark.parametrize("factory", [llama, bert])
def test_auto_dense_calls_probe_sparsity(factory):
    """Every PROBE_EVERY steps of at most max_rows rows, "auto" tries the dense ops, which measure the zeros."""
    model = build(factory)
    ids = torch.tensor([[5, 17, 42, 9, 77]])
    acts = []
    hooks = [
        s.module.register_forward_hook(lambda m, i, o: acts.append(o)) for s in hf_helu.find_activation_sites(model)
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    handle = hf_helu.sparse_inference(model, max_rows=8)
    # the kernel is preferred, and the next step is a probe: dense, measuring zeros
    handle.modules[0].dispatch.clock.steps = PROBE_EVERY - 1
    with torch.no_grad():
        model(ids)
    assert handle.sparse_calls == 0
    assert handle.sparsity == pytest.approx([float(a.eq(0).double().mean()) for a in acts])
    handle.remove()


def _operands(m, d, dout, dtype, gated, bias, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    first = rand(m, d)
    return (
        first,
        rand(m) if bias else None,
        rand(m, d) if gated else None,
        rand(m) if bias and gated else None,
        rand(m, dout),
        rand(dout) if bias else None,
    )


def _reference64(x, first, first_bias, second, second_bias, down_t, down_bias):
    """The FFN written densely in float64: (relu(x A^T + a) * (x B^T + b)) D + c, with D = down_t."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    x, first, second, down_t = f(x), f(first), f(second), f(down_t)
    gate = x @ first.T + (0 if first_bias is None else f(first_bias))
    h = gate.clamp(min=0)
    if second is not None:
        h = h * (x @ second.T + (0 if second_bias is None else f(second_bias)))
    out = h @ down_t + (0 if down_bias is None else f(down_bias))
    terms = h.abs() @ down_t.abs()  # sum of |products| of the last sum: the scale of its rounding error
    return out, terms, int((gate > 0).any(0).sum())


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("gated", "bias"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(dtype, gated, bias, rows, threads):
    d, m, dout = 72, 300, 40  # not multiples of the vector width: the tails run too
    ops = _operands(m, d, dout, dtype, gated, bias, seed=rows)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, active = sparse_kernel.sparse_ffn(x, *ops)
    finally:
        torch.set_num_threads(previous)
    ref, terms, ref_active = _reference64(x, *ops)
    torch_out, torch_active = torch_sparse_ffn(x.float(), *(None if t is None else t.float() for t in ops))
    assert out.dtype == dtype and out.shape == (rows, dout)
    assert active == ref_active == torch_active
    # fp32 accumulation of the dot products and the sum: a few ulp of the magnitude of the terms (the gate and
    # up factors carry the same relative error); bf16 output adds half a bf16 ulp of the value.
    half_ulp = 0.0 if dtype == torch.float32 else 2.0**-8
    allowed = 4 * (d + m) * EPS32 * (terms + 1) + half_ulp * ref.abs()
    assert ((out.double() - ref).abs() <= allowed).all()
    assert ((torch_out.double() - ref).abs() <= allowed).all()


@kernel
def test_kernel_skips_inactive_rows():
    """Units whose gate is <= 0 are not read: NaN in their up and down rows does not reach the output."""
    d, m, dout = 32, 128, 16
    first, _, second, _, down_t, _ = _operands(m, d, dout, torch.float32, True, False, seed=4)
    x = torch.randn(1, d)
    dead = (x @ first.T <= 0).squeeze(0)
    second[dead] = float("nan")
    down_t[dead] = float("nan")
    out, active = sparse_kernel.sparse_ffn(x, first, None, second, None, down_t, None)
    assert active == int((~dead).sum()) and torch.isfinite(out).all()


# --- the kernel's cache gets the HeLU kernels' damaged-cache treatment (c_library) ---------------------------------

_RUN_KERNEL = """
import hashlib, torch
from hf_helu.sparse import kernel as sparse_kernel
from hf_helu.sparse.modules import torch_sparse_ffn
g = torch.Generator().manual_seed(0)
x, first, down_t = torch.randn(2, 48, generator=g), torch.randn(640, 48, generator=g), torch.randn(640, 24, generator=g)
out, active = sparse_kernel.sparse_ffn(x, first, None, None, None, down_t, None)
ref, ref_active = torch_sparse_ffn(x, first, None, None, None, down_t, None)
assert active == ref_active and torch.allclose(out, ref, rtol=1e-4, atol=1e-3)
print("CHUNKS", sparse_kernel.chunks(640), "OUT", hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def _run_kernel(cache: Path) -> subprocess.CompletedProcess:
    """One sparse FFN kernel call, checked against torch ops, in a fresh process using the kernel cache ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env.update({c_library.CACHE_ENV_VAR: str(cache), "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "2"})
    return subprocess.run([sys.executable, "-c", _RUN_KERNEL], env=env, capture_output=True, text=True, timeout=300)


def _kernel_warnings(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "RuntimeWarning: sparse FFN CPU kernel" in line]


def _foreign_with_checksum(path: Path) -> None:
    """A library without the kernel's symbols, its checksum written beside it: verification alone passes it."""
    source = path.with_suffix(".foreign.c")
    source.write_text("int not_sparse_ffn(void) { return 1; }\n")
    subprocess.run([c_library.compiler(), "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    source.unlink()
    c_library.checksum_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


_KERNEL_DAMAGE = {
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "failed verification"),
    "foreign": (_foreign_with_checksum, "no sparse FFN kernel library"),
}


@kernel
@pytest.mark.slow
@pytest.mark.parametrize("damage", list(_KERNEL_DAMAGE))
def test_damaged_kernel_cache_is_rebuilt_with_one_warning(damage, tmp_path):
    clean = _run_kernel(tmp_path / "cache")
    assert clean.returncode == 0 and not _kernel_warnings(clean), clean.stderr[-3000:]
    libraries = sorted((tmp_path / "cache").glob("sparse_ffn_*.so"))
    assert len(libraries) == 1, list((tmp_path / "cache").iterdir())
    hurt, said = _KERNEL_DAMAGE[damage]
    hurt(libraries[0])
    done = _run_kernel(tmp_path / "cache")
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout == clean.stdout  # the same OpenMP build and the same output bits as from a clean cache
    warned = _kernel_warnings(done)
    assert len(warned) == 1 and str(libraries[0]) in warned[0] and said in warned[0], done.stderr[-3000:]
    assert c_library.verify(libraries[0]) is None  # rebuilt in place, checksum beside it
    again = _run_kernel(tmp_path / "cache")
    assert again.returncode == 0 and again.stdout == clean.stdout and not _kernel_warnings(again), again.stderr


@pytest.mark.parametrize("factory", [llama, gpt2, bert, whisper])
def test_reversible_and_state_dict_unchanged(factory):
    model = build(factory)
    before = dict(model.named_modules())
    state = model.state_dict()
    handle = hf_helu.sparse_inference(model)
    swapped = model.state_dict()
    assert list(swapped) == list(state)
    assert all(swapped[k] is state[k] or torch.equal(swapped[k], state[k]) for k in state)
    kinds = (GatedSparseFFN, PlainSparseFFN)
    assert sum(isinstance(m, kinds) for m in model.modules()) == len(handle.blocks) > 0
    assert hf_helu.dense_inference(model) is True
    assert hf_helu.dense_inference(model) is False
    after = dict(model.named_modules())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def test_auto_falls_back_to_dense():
    model = build(llama)
    # min_sparsity 1: after the first measured call the running sparsity is below it, so decode runs dense.
    handle = hf_helu.sparse_inference(model, min_sparsity=1.0)
    greedy(model, PROMPTS[0], n=20)
    per_block = 20  # generate calls each block once per step (the prefill included)
    assert handle.dense_calls >= len(handle.blocks) * (per_block - 2)
    handle.remove()
    handle = hf_helu.sparse_inference(model)
    model(torch.tensor([[5]]))  # under autograd: the dense modules, never the kernel
    assert handle.sparse_calls == 0 and handle.dense_calls == len(handle.blocks)
    model.train()  # switched to training after the swap: dense (dropout and all), even without autograd
    with torch.no_grad():
        model(torch.tensor([[5]]))
    assert handle.sparse_calls == 0 and handle.dense_calls == 2 * len(handle.blocks)
    handle.remove()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: llama("silu"), "SiLU"),
        (lambda: gpt2("gelu_new"), "not ReLU/HeLU"),
        (lambda: bert("gelu"), "GELU"),
    ],
)
def test_non_relu_model_refused_before_any_change(factory, match):
    model = build(factory)
    before = [type(m) for m in model.modules()]
    with pytest.raises(UsageError, match=match):
        hf_helu.sparse_inference(model)
    assert [type(m) for m in model.modules()] == before


def test_training_mode_and_misuse_refused():
    model = build(llama).train()
    with pytest.raises(UsageError, match="training mode"):
        hf_helu.sparse_inference(model)
    model.eval()
    for kwargs, match in [({"mode": "fast"}, "mode"), ({"max_rows": 0}, "max_rows"), ({"min_sparsity": 2}, "min_")]:
        with pytest.raises(UsageError, match=match):
            hf_helu.sparse_inference(model, **kwargs)
    with pytest.raises(UsageError, match="transformers model"):
        hf_helu.sparse_inference(nn.Linear(2, 2))
    handle = hf_helu.sparse_inference(model)
    with pytest.raises(UsageError, match="already"):
        hf_helu.sparse_inference(model)
    handle.remove()
