"""hf_helu.sparse_inference is safe to switch on anywhere: the kernel really runs on decode steps, the weights it
reads are always the model's current ones, and no OpenMP setting or torch.compile backend changes a result or
crashes the process.

Outputs are compared with the same model run dense (a copy never swapped, edited the same way) within fp32
rounding of the values; the broken cases these tests guard against are off by 0.1 or more (or NaN, or 1e37).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sparse_helpers import PROMPTS, build, gpt2, greedy, llama

import hf_helu
from hf_helu.sparse import kernel as sparse_kernel
from hf_helu.sparse.modules import PROBE_EVERY, Dispatch, StepClock

needs_kernel = pytest.mark.skipif(not sparse_kernel.available(), reason="no C compiler for the sparse FFN kernel")
FACTORIES = {"llama": llama, "gpt2": gpt2}
STEP = torch.tensor([[7]])  # one token: a decode-sized call, which the kernel takes


def logits(model, ids=STEP) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= rel * (1 + b.abs().max())).all())


class KernelCalls:
    """Counts the calls of the C kernel's wrapper (what the modules call on a sparse step)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = sparse_kernel.sparse_ffn

        def counted(*args):
            self.count += 1
            return real(*args)

        monkeypatch.setattr(sparse_kernel, "sparse_ffn", counted)


@needs_kernel
@pytest.mark.parametrize("name", list(FACTORIES))
def test_kernel_called_on_every_decode_step(name, monkeypatch):
    model = build(FACTORIES[name])
    dense = greedy(model, PROMPTS[0], n=12)
    calls = KernelCalls(monkeypatch)
    handle = hf_helu.sparse_inference(model)  # "auto": prefill dense, each of the 11 decode steps on the kernel
    sparse = greedy(model, PROMPTS[0], n=12)
    handle.remove()
    assert torch.equal(dense, sparse)
    assert calls.count == 11 * len(handle.blocks) == handle.sparse_calls


# --- the weights the kernel reads are the model's current ones -------------------------------------------------


def _down(model, name):
    return model.model.layers[0].mlp.down_proj if name == "llama" else model.transformer.h[0].mlp.c_proj


def _up(model, name):
    return model.model.layers[1].mlp.up_proj if name == "llama" else model.transformer.h[1].mlp.c_fc


def _swapped_pair(name):
    model = build(FACTORIES[name])
    reference = copy.deepcopy(model)
    handle = hf_helu.sparse_inference(model, mode="sparse")
    return model, reference, handle


@needs_kernel
@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_edit_through_data_reaches_the_kernel(name, monkeypatch):
    model, reference, handle = _swapped_pair(name)
    logits(model)  # the kernel has run once on the weights before the edit
    for m in (model, reference):
        _down(m, name).weight.data.mul_(2)  # .data: no version counter bump, same data pointer
        _up(m, name).weight.data[:, :5] = 0.5
    calls = KernelCalls(monkeypatch)
    out = logits(model)
    assert calls.count == len(handle.blocks)
    assert close(out, logits(reference))
    handle.remove()


@needs_kernel
@pytest.mark.parametrize("name", list(FACTORIES))
def test_load_state_dict_assign_reaches_the_kernel_and_survives_remove(name):
    model, _, handle = _swapped_pair(name)
    logits(model)
    fresh = build(FACTORIES[name], seed=5)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert close(logits(model), logits(fresh))
    handle.remove()
    assert close(logits(model), logits(fresh))  # the original modules got the new weights back
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())


@needs_kernel
@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("when", ["before swap", "after swap"])
def test_non_contiguous_weights_read_by_their_strides(name, when):
    model = build(FACTORIES[name])
    reference = copy.deepcopy(model)

    def transpose_layout(m):
        for proj in (_down(m, name), _up(m, name)):
            proj.weight.data = proj.weight.data.t().contiguous().t()  # same values, column-major

    transpose_layout(reference)
    strides = [p.stride() for p in reference.parameters()]
    if when == "before swap":
        transpose_layout(model)
    handle = hf_helu.sparse_inference(model, mode="sparse")
    logits(model)
    if when == "after swap":
        transpose_layout(model)
    assert close(logits(model), logits(reference))
    assert handle.sparse_calls > 0
    handle.remove()
    if when == "before swap":  # remove() gives each parameter its strides back
        assert [p.stride() for p in model.parameters()] == strides


@needs_kernel
@pytest.mark.parametrize("name", list(FACTORIES))
def test_redtyped_model_matches_dense(name):
    model, reference, handle = _swapped_pair(name)
    logits(model)
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    before = handle.sparse_calls
    out, ref = logits(model), logits(reference)
    assert handle.sparse_calls > before  # bf16 runs on the kernel too
    assert close(out, ref, rel=0.05)  # bf16 rounding; the float32 weights read as bf16 would be off by far more
    handle.remove()


@needs_kernel
def test_remove_restores_layout_and_values():
    model = build(llama)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: v.stride() for k, v in model.named_parameters()}
    handle = hf_helu.sparse_inference(model)
    assert _down(model, "llama").weight.stride() == (1, 64)  # stored by unit while swapped
    handle.remove()
    assert {k: v.stride() for k, v in model.named_parameters()} == strides
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@needs_kernel
def test_inf_weight_of_an_inactive_unit_is_skipped_with_a_warning():
    """Decided behaviour: the sparse path never reads the rows of units that are off for the token, so an inf there
    does not reach the output (dense computes 0 x inf = NaN). The sparse result is the dense result of the same
    weights with those entries zeroed; the swap warns that the weights hold non-finite values."""
    model = build(llama)
    mlp = model.model.layers[0].mlp
    seen = []
    hook = mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.reshape(-1)))
    logits(model)
    hook.remove()
    off = int(torch.nonzero(seen[0] <= 0)[0])  # a unit that is off for this token
    zeroed = copy.deepcopy(model)
    mlp.down_proj.weight.data[:, off] = float("inf")
    assert torch.isnan(logits(model)).all()  # dense
    with pytest.warns(RuntimeWarning, match="non-finite"):
        handle = hf_helu.sparse_inference(model, mode="sparse")
    out = logits(model)
    assert torch.isfinite(out).all() and close(out, logits(zeroed))
    handle.remove()


# --- OpenMP settings and torch.compile, each in a fresh process -------------------------------------------------

_OPENMP_SCRIPT = textwrap.dedent(
    """
    import torch, transformers, hf_helu
    from hf_helu.sparse import kernel
    from hf_helu.sparse.modules import torch_sparse_ffn
    torch.set_num_threads(2)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, first, second, down_t = (torch.randn(*s, generator=g) for s in ((1, 48), (700, 48), (700, 48), (700, 40)))
    out, active = kernel.sparse_ffn(x, first, None, second, None, down_t, None)
    ref, ref_active = torch_sparse_ffn(x, first, None, second, None, down_t, None)
    assert active == ref_active, (active, ref_active)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3), (out - ref).abs().max()
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                                      intermediate_size=700, num_key_value_heads=2, hidden_act="relu")
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        handle = hf_helu.sparse_inference(model, mode="sparse")
        sparse = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert handle.sparse_calls > 0 and torch.equal(dense, sparse), (dense, sparse)
    print("OK", kernel.chunks(700))
    """
)

OPENMP_SETTINGS = {
    "OMP_DYNAMIC=true": {"OMP_DYNAMIC": "true"},
    "OMP_THREAD_LIMIT=1": {"OMP_THREAD_LIMIT": "1"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    "nested, max active levels 1": {"OMP_MAX_ACTIVE_LEVELS": "1", "OMP_NESTED": "false"},
}


def _run(script: str, env_extra: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(env_extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("setting", list(OPENMP_SETTINGS))
def test_kernel_exact_under_openmp_setting(setting):
    done = _run(_OPENMP_SCRIPT, OPENMP_SETTINGS[setting])
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr[-3000:]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers, hf_helu
    backend = sys.argv[1]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                                      intermediate_size=176, num_key_value_heads=2, hidden_act="relu")
    model = transformers.LlamaForCausalLM(config).eval()
    step = torch.tensor([[7]])
    with torch.no_grad():
        dense = model(step).logits
    handle = hf_helu.sparse_inference(model)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(step)
        compiled = torch.compile(model, backend=backend)
        outs = [compiled(step).logits for _ in range(3)]
    assert all(torch.allclose(o, dense, rtol=1e-4, atol=1e-5) for o in outs), [(o - dense).abs().max() for o in outs]
    handle.remove()
    print("OK", explained.graph_count, explained.graph_break_count)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_of_a_swapped_model_runs_and_matches(backend):
    done = _run(_COMPILE_SCRIPT.replace("sys.argv[1]", repr(backend)), {}, timeout=900)
    assert done.returncode == 0 and done.stdout.startswith("OK"), (done.returncode, done.stderr[-3000:])


def _steps(clock: StepClock, ns: dict[bool, int], count: int) -> list[bool]:
    """The paths of ``count`` decode steps whose durations are ``ns[path]`` (a fake clock)."""
    now, paths = 0, []
    for _ in range(count):
        clock.start_step(now)
        paths.append(clock.sparse)
        now += ns[clock.sparse]
    return paths


def test_auto_takes_the_path_measured_faster_a_whole_step_at_a_time():
    """Where sparse steps are measured slower than dense ones (e.g. beside another job), "auto" runs dense and tries
    the kernel again every PROBE_EVERY steps; where sparse is faster, dense is the path tried."""
    clock = StepClock()
    paths = _steps(clock, {True: 2000, False: 1000}, 4 * PROBE_EVERY)  # sparse steps take 2 us, dense 1 us
    assert paths[:PROBE_EVERY] == [i != PROBE_EVERY - 1 for i in range(PROBE_EVERY)]  # until a dense step is timed
    assert paths[-2 * PROBE_EVERY :] == [i % PROBE_EVERY == PROBE_EVERY - 1 for i in range(2 * PROBE_EVERY)]
    paths = _steps(clock, {True: 2000, False: 3000}, 4 * PROBE_EVERY)  # dense got slower than the kernel
    assert paths[-2 * PROBE_EVERY :] == [i % PROBE_EVERY != PROBE_EVERY - 1 for i in range(2 * PROBE_EVERY)]
    clock.void()  # a prefill call: the step under way is not timed
    kept = {path: list(times) for path, times in clock.times.items()}
    clock.start_step(10**12)
    assert clock.times == kept


def test_every_module_takes_the_step_path_of_the_first():
    """One clock per swapped model: the first module to ask opens each step, the others follow its path (dense
    where their own sparsity is below min_sparsity, or the kernel is out), and only dense probe steps measure."""
    clock = StepClock()
    first, other, thin = (Dispatch(clock=clock) for _ in range(3))
    thin.sparsity = 0.1
    for step in range(1, 2 * PROBE_EVERY + 1):
        clock.void()  # steps left untimed: the preference stays the kernel
        sparse, probe = first.choose(kernel_ok=True)
        assert (sparse, probe) == (step % PROBE_EVERY != 0, step % PROBE_EVERY == 0)
        assert other.choose(kernel_ok=True) == (sparse, probe)
        assert thin.choose(kernel_ok=True) == (False, probe)
        assert other.choose(kernel_ok=False) == (False, probe)
    assert clock.steps == 2 * PROBE_EVERY
    assert Dispatch(mode="dense").choose(kernel_ok=True) == (False, False)
    assert Dispatch(mode="sparse").choose(kernel_ok=True) == (True, False)


_WORKERS_SCRIPT = textwrap.dedent(
    """
    import pathlib, time, torch
    from hf_helu.sparse import kernel
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(1536, 64, generator=g), torch.randn(1536, 64, generator=g), torch.randn(1536, 64, generator=g)]
    x = torch.randn(1, 64, generator=g)
    for _ in range(200):
        kernel.sparse_ffn(x, w[0], None, w[1], None, w[2], None)
    time.sleep(0.5)  # far longer than any spin-wait
    states = []
    for task in pathlib.Path("/proc/self/task").iterdir():
        if (task / "comm").read_text().strip() == "hf_helu-sparse":
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    print("STATES", " ".join(states))
    """
)


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_kernel_workers_sleep_between_calls():
    """The kernel's own workers (no OpenMP team) wait on a condition variable, not in a spin: half a second after
    the last call each is asleep (state S), so a decode step leaves no thread taking CPU time from a busy machine."""
    done = _run(_WORKERS_SCRIPT, {})
    assert done.returncode == 0, done.stderr[-2000:]
    states = done.stdout.split("STATES", 1)[1].split()
    assert states and all(state == "S" for state in states), states
