"""ActivationMonitor (hf_helu.diagnostics.monitor): exact counts on planted weights, masks, HeLU band,
multi-process reduction, clean detach."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diagnostics_helpers import (
    PLANTED,
    assert_matches_reference,
    capture_outputs,
    ffn_sites,
    plant_dead_units,
    reference_stats,
    sparse_helu_bert,
    tiny_bert,
    tiny_wav2vec2,
    token_batches,
)
from helpers import REPO
from torch import nn

import hf_helu
from hf_helu.diagnostics import ActivationMonitor, ActivationStats

TESTS_DIR = REPO / "tests"


@pytest.mark.parametrize("hidden_act", ["relu", "gelu", "helu"])
def test_planted_dead_units_are_exactly_the_dead_ones(hidden_act):
    model = tiny_bert(hidden_act)
    plant_dead_units(model, boost_others=True)
    batches = token_batches()
    with ActivationMonitor(model, ffn_sites(model)) as monitor, torch.no_grad():
        for batch in batches:
            model(**batch)
    stats = monitor.stats()
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    for index, layer in enumerate(stats.layers):
        assert list(layer.dead_indices) == PLANTED[index]
        assert layer.units == 64
        assert layer.dead_fraction == len(PLANTED[index]) / 64
        assert layer.tokens == tokens  # padding excluded
        # Planted units output exactly 0 (GELU: -0.0) everywhere; all others are > 0 everywhere.
        assert layer.zero_fraction == len(PLANTED[index]) / 64
        assert (layer.band_elements is not None) == (hidden_act == "helu")
    assert stats.dead_fraction == 5 / 128
    as_json = json.loads(json.dumps(stats.to_dict(include_indices=True)))
    assert as_json["dead_units"] == 5 and as_json["layers"][1]["dead_indices"] == PLANTED[1]
    assert stats.history_entry(7) == {"step": 7, "dead_fraction": [3 / 64, 2 / 64]}


@pytest.mark.parametrize("hidden_act", ["relu", "helu"])
def test_random_model_matches_direct_count_of_captured_outputs(hidden_act):
    model = tiny_bert(hidden_act, seed=3)
    with torch.no_grad():  # make dead units and zeros common, so the counts are not trivial
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight.mul_(10)
            layer.intermediate.dense.bias.fill_(-2.5)
    batches = token_batches()
    sites = ffn_sites(model)
    records, handles = capture_outputs(sites)
    with ActivationMonitor(model, sites, alpha=0.5) as monitor, torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    stats = monitor.stats()
    reference = reference_stats(records, [b["attention_mask"] for b in batches], alpha=0.5)
    assert all(0 < len(entry["dead"]) < 64 for entry in reference.values())
    assert_matches_reference(stats, reference)
    assert all(layer.alpha == 0.5 for layer in stats.layers)


def test_padding_does_not_make_a_unit_look_alive():
    relu = nn.ReLU()
    x = torch.tensor([[[1.0, -1.0, -1.0], [-1.0, 2.0, -1.0]], [[1.0, -1.0, -1.0], [-1.0, -1.0, 3.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])  # unit 2 fires only at the padded position
    monitor = ActivationMonitor(sites={"act": relu})
    with monitor:
        monitor.token_mask = mask
        relu(x)
    stats = monitor.stats()
    assert list(stats.layers[0].dead_indices) == [2]
    assert stats.layers[0].tokens == 3
    assert stats.layers[0].zero_elements == 6
    monitor.reset()
    with monitor:
        relu(x)  # no mask: every position counts
    assert list(monitor.stats().layers[0].dead_indices) == []


def test_nan_outputs_are_flagged_and_empty_batches_only_counted_as_calls():
    relu = nn.ReLU()
    with ActivationMonitor(sites={"act": relu}) as monitor:
        relu(torch.tensor([[1.0, -1.0], [float("nan"), 2.0]]))
        relu(torch.zeros(0, 2))
    stats = monitor.stats()
    layer = stats.layers[0]
    assert (layer.nan_calls, layer.calls, layer.tokens, layer.zero_elements) == (1, 2, 2, 1)
    assert "NaN" in stats.table()


def test_attention_mask_is_captured_from_keyword_and_positional_arguments():
    model = tiny_bert("relu")
    batch = token_batches(shapes=((4, 10),))[0]
    assert 0 < int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()
    results = []
    for call in (lambda: model(**batch), lambda: model(batch["input_ids"], batch["attention_mask"])):
        with ActivationMonitor(model, ffn_sites(model)) as monitor, torch.no_grad():
            call()
        results.append(monitor.stats())
        assert all(layer.tokens == int(batch["attention_mask"].sum()) for layer in results[-1].layers)
        assert all(layer.unmasked_calls == 0 for layer in results[-1].layers)
    assert results[0] == results[1]


def test_hysteresis_band_is_where_gradient_passes_but_output_is_zero():
    alpha = 0.3
    act = hf_helu.HeLU(alpha).train()
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 5, 40, generator=gen) * 0.5).requires_grad_()
    with ActivationMonitor(sites={"act": act}) as monitor:
        y = act(z)
        y.backward(torch.ones_like(y))
    layer = monitor.stats().layers[0]
    passes_but_zero = (z.grad != 0) & (y.detach() == 0)
    assert layer.alpha == alpha
    assert layer.band_elements == int(passes_but_zero.sum()) > 0
    assert layer.band_fraction == int(passes_but_zero.sum()) / z.numel()
    assert layer.zero_elements == int((y == 0).sum())


# -- hooks ----------------------------------------------------------------------------------


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_detach_removes_every_hook_and_outputs_are_identical():
    model = tiny_bert("helu")
    batch = token_batches()[0]
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    monitor = ActivationMonitor(model, ffn_sites(model))
    with monitor, torch.no_grad():
        during = model(**batch).last_hidden_state
        assert all_hooks(model) == 4  # one per FFN activation + the model's mask capture pair
    assert all_hooks(model) == 0 and not monitor.attached
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    assert torch.equal(before, during) and torch.equal(before, after)
    with pytest.raises(RuntimeError, match="boom"), monitor:
        raise RuntimeError("boom")
    assert all_hooks(model) == 0


def test_errors_name_the_problem():
    model = tiny_bert("relu")
    sites = ffn_sites(model)
    with pytest.raises(ValueError, match="never called"):
        ActivationMonitor(model, sites).stats()
    with pytest.raises(ValueError, match="same module object"):
        ActivationMonitor(sites={"a": sites[next(iter(sites))], "b": sites[next(iter(sites))]})
    with pytest.raises(ValueError, match="neither"):
        ActivationMonitor()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ActivationMonitor(sites={"a": torch.relu})
    monitor = ActivationMonitor(model, sites).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        monitor.attach()
    monitor.token_mask = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"token_mask has shape \(3, 3\)"), torch.no_grad():
        model(**token_batches()[0])
    monitor.detach()
    assert all_hooks(model) == 0


# -- families: discovery on patched / unpatched / speech models ---------------------------------


def test_default_sites_on_gelu_and_patched_bert():
    from hf_helu.patching import patch_model

    model = tiny_bert("gelu")
    monitor = ActivationMonitor(model)
    assert monitor.names == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert ActivationMonitor(nn.DataParallel(model)).names == monitor.names
    assert ActivationMonitor(sites=hf_helu.find_activation_sites(model)).names == monitor.names
    patch_model(model, alpha=0.1)
    batches = token_batches()
    sites = ffn_sites(model)
    assert all(isinstance(module, hf_helu.HeLU) for module in sites.values())
    records, handles = capture_outputs(sites)
    with ActivationMonitor(model) as monitor, torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    stats = monitor.stats()
    assert [layer.layer_index for layer in stats.layers] == [0, 1]
    assert all(layer.alpha == 0.1 for layer in stats.layers)
    assert_matches_reference(stats, reference_stats(records, [b["attention_mask"] for b in batches], alpha=0.1))


def test_wav2vec2_frames_are_masked_from_the_sample_mask():
    model = tiny_wav2vec2()
    lengths = torch.tensor([400, 260, 333])
    audio = torch.randn(3, 400) * (torch.arange(400)[None, :] < lengths[:, None])
    sample_mask = (torch.arange(400)[None, :] < lengths[:, None]).long()
    frames = model._get_feat_extract_output_lengths(lengths)
    frame_mask = torch.arange(int(frames.max()))[None, :] < frames[:, None]
    sites = {
        f"encoder.layers.{i}.feed_forward.intermediate_act_fn": m
        for i, m in enumerate(layer.feed_forward.intermediate_act_fn for layer in model.encoder.layers)
    }
    records, handles = capture_outputs(sites)
    with ActivationMonitor(model) as monitor, torch.no_grad():
        model(audio, attention_mask=sample_mask)
    for handle in handles:
        handle.remove()
    assert monitor.names == list(sites)
    stats = monitor.stats()
    assert all(layer.tokens == int(frames.sum()) < frame_mask.numel() for layer in stats.layers)
    assert_matches_reference(stats, reference_stats(records, [frame_mask]))


def test_wav2vec2_conv_activations_count_channels_over_each_layers_frames():
    """scope="all": the feature encoder's and positional conv's activations see (batch, channels, frames).
    Units are the channels, and each conv layer's padded frames (found by running every clip unpadded) are
    masked out; batches of different lengths must not change the unit count."""
    model = tiny_wav2vec2(num_hidden_layers=1, feat_extract_activation="relu", conv_dim=(16, 24))
    conv_sites = {
        f"feature_extractor.conv_layers.{i}.activation": layer.activation
        for i, layer in enumerate(model.feature_extractor.conv_layers)
    }
    conv_sites["encoder.pos_conv_embed.activation"] = model.encoder.pos_conv_embed.activation
    batches = [torch.tensor([400, 260, 333]), torch.tensor([150, 290])]
    records, handles = capture_outputs(conv_sites)
    with ActivationMonitor(model, scope="all") as monitor, torch.no_grad():
        for lengths in batches:
            width = int(lengths.max())
            keep = torch.arange(width)[None, :] < lengths[:, None]
            model(torch.randn(len(lengths), width) * keep, attention_mask=keep.long())
    for handle in handles:
        handle.remove()
    # Reference frames per clip and site: run each clip alone, unpadded, and count the frames it produces.
    frame_counts = {name: [] for name in conv_sites}
    counting, handles = capture_outputs(conv_sites)
    with torch.no_grad():
        for lengths in batches:
            for length in lengths.tolist():
                model(torch.randn(1, length))
                for name in conv_sites:
                    frame_counts[name].append(counting[name].pop()[1].shape[-1])
    for handle in handles:
        handle.remove()
    channels_last, masks = {}, {}
    for name, calls in records.items():
        channels_last[name] = [(z.movedim(1, -1), y.movedim(1, -1)) for z, y in calls]
        counts = iter(frame_counts[name])
        masks[name] = []
        for (_, y), lengths in zip(calls, batches, strict=True):
            frames = torch.tensor([next(counts) for _ in lengths])
            masks[name].append(torch.arange(y.shape[-1])[None, :] < frames[:, None])
    stats = monitor.stats()
    by_name = {layer.name: layer for layer in stats.layers}
    assert [by_name[name].units for name in conv_sites] == [16, 24, 32]  # channels, not frames
    for name in conv_sites:
        reference = reference_stats({name: channels_last[name]}, masks[name])
        assert_matches_reference(ActivationStats((by_name[name],)), reference)
        assert by_name[name].unmasked_calls == 0
    assert (
        by_name["feature_extractor.conv_layers.0.activation"].tokens
        > by_name["encoder.pos_conv_embed.activation"].tokens
    )


# -- multi-process ---------------------------------------------------------------------------

WORKER = """
import json, sys
import torch
from accelerate import Accelerator
sys.path.insert(0, {tests_dir!r})
from diagnostics_helpers import capture_outputs, ffn_sites, sparse_helu_bert, token_batches
from hf_helu.diagnostics import ActivationMonitor

accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, accelerator.num_processes
model = sparse_helu_bert()
mine = token_batches()[accelerator.process_index :: 2]
records, _ = capture_outputs(ffn_sites(model))
with ActivationMonitor(model) as monitor, torch.no_grad():
    for batch in mine:
        model(**batch)
local_dead = []
for calls in records.values():
    rows = torch.cat([y[b["attention_mask"].bool()] for (_, y), b in zip(calls, mine)])
    local_dead.append((~(rows > 0).any(0)).nonzero().flatten().tolist())
via_accelerate = monitor.stats(accelerator).to_dict(include_indices=True)
via_distributed = monitor.stats().to_dict(include_indices=True)
gathered = [None, None]
torch.distributed.all_gather_object(gathered, local_dead)
if accelerator.is_main_process:
    with open({out!r}, "w") as handle:
        json.dump({{"accelerate": via_accelerate, "distributed": via_distributed, "local_dead": gathered}}, handle)
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # an undestroyed gloo group can abort the process at exit
"""


# Launcher failures a concurrent job on the same machine can cause (a port taken between choice and bind).
LAUNCH_FAILURES = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnectionError")


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    out = tmp_path / "stats.json"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests_dir=str(TESTS_DIR), out=str(out)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    for _attempt in range(2):  # one retry, only when the launcher could not set up its network
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        if done.returncode == 0 or not any(sign in output for sign in LAUNCH_FAILURES):
            break
    assert done.returncode == 0, output[-4000:]
    result = json.loads(out.read_text())

    model = sparse_helu_bert()
    with ActivationMonitor(model) as monitor, torch.no_grad():
        for batch in token_batches():
            model(**batch)
    single = monitor.stats().to_dict(include_indices=True)
    assert result["accelerate"] == single
    assert result["distributed"] == single
    # The union matters: the processes disagree on which units are dead, and the global set is their intersection.
    rank0, rank1 = result["local_dead"]
    assert rank0 != rank1
    for layer, dead0, dead1 in zip(single["layers"], rank0, rank1, strict=True):
        assert layer["dead_indices"] == sorted(set(dead0) & set(dead1))
    assert single["band_fraction"] > 0 and 0 < single["dead_fraction"] < 1
