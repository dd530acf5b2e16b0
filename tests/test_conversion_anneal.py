"""Annealing (hf_helu.conversion.anneal): the blend formula mid-schedule, bit for bit stock ReLU at its end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conversion_helpers import random_batches, relu_twin, tiny_bert
from torch import nn

import hf_helu  # noqa: F401  (registers "helu")
from hf_helu import conversion
from hf_helu.activation import HeLU
from hf_helu.patching import patch_model


def test_annealing_schedule_ends_exactly_in_helu():
    gelu_model = tiny_bert()
    model = copy.deepcopy(gelu_model)
    originals = conversion.original_activations(model)
    patch_model(model)
    annealer = conversion.ActivationAnnealer(model, originals, total_steps=8, anneal_fraction=0.5)
    batch = random_batches(count=1)[0]
    acts = {}
    model.encoder.layer[1].intermediate.register_forward_hook(lambda m, a, o: acts.__setitem__("out", o))
    model.encoder.layer[1].intermediate.dense.register_forward_hook(lambda m, a, o: acts.__setitem__("z", o))

    with torch.no_grad():
        assert annealer.mix == 0.0
        torch.testing.assert_close(model(**batch).last_hidden_state, gelu_model(**batch).last_hidden_state)
        mixes = []
        for step in range(1, 9):
            mixes.append(annealer.step())
            model(**batch)
            z = acts["z"]
            if step < 4:
                expected = (1 - step / 4) * nn.functional.gelu(z) + (step / 4) * torch.relu(z)
                torch.testing.assert_close(acts["out"], expected)
                assert not annealer.finished
    assert mixes == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert annealer.finished and annealer.anneal_steps == 4
    # Pure HeLU now: no hooks left on the activation modules, forward bit-exact with stock ReLU.
    for layer in model.encoder.layer:
        assert isinstance(layer.intermediate.intermediate_act_fn, HeLU)
        assert not layer.intermediate.intermediate_act_fn._forward_hooks
    twin = relu_twin(model)
    model.train()
    twin.train()
    torch.manual_seed(1)
    out = model(**batch).last_hidden_state
    torch.manual_seed(1)
    assert torch.equal(out, twin(**batch).last_hidden_state)
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, twin(**batch).last_hidden_state)


def test_annealing_gradient_blends_original_and_helu():
    """Mid-schedule the activation's gradient is (1-l) gelu'(z) + l * 1[z > -alpha]."""
    model = tiny_bert(layers=1)
    originals = conversion.original_activations(model)
    patch_model(model, alpha=0.3)
    annealer = conversion.ActivationAnnealer(model, originals, total_steps=4, anneal_fraction=1.0)
    annealer.step()  # l = 0.25
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    z = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    act.train()
    act(z).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    nn.functional.gelu(z_ref).sum().backward()
    expected = 0.75 * z_ref.grad + 0.25 * (z.detach() > -0.3).double()
    torch.testing.assert_close(z.grad, expected)


def test_gradient_annealing_keeps_the_relu_forward():
    """calibrate+anneal: forward is the calibrated ReLU model, gradient (1-l) gelu'(z) + l * 1[z > -alpha]."""
    model = tiny_bert(layers=1)
    result = conversion.convert_model(
        model, "calibrate+anneal", alpha=0.3, calibration_batches=random_batches(count=1), total_steps=4
    )
    annealer = result.annealer
    assert annealer.mode == "gradient"
    annealer.step()  # l = 0.5 (anneal over 2 of 4 steps)
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    act.train()
    z = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    out = act(z)
    torch.testing.assert_close(out, torch.relu(z), rtol=0, atol=1e-15)
    out.sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    nn.functional.gelu(z_ref).sum().backward()
    torch.testing.assert_close(z.grad, 0.5 * z_ref.grad + 0.5 * (z.detach() > -0.3).double())
    batch = random_batches(count=1)[0]
    twin = relu_twin(model)
    with torch.no_grad():  # without autograd the forward is exactly ReLU's, even mid-schedule
        assert torch.equal(model(**batch).last_hidden_state, twin(**batch).last_hidden_state)
    annealer.step()
    assert annealer.finished


def test_annealer_state_and_errors():
    model = tiny_bert(layers=1)
    originals = conversion.original_activations(model)
    with pytest.raises(TypeError, match="patch the model before annealing"):
        conversion.ActivationAnnealer(model, originals, total_steps=10)
    patch_model(model)
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="anneal_fraction"):
            conversion.ActivationAnnealer(model, originals, total_steps=10, anneal_fraction=bad)
    annealer = conversion.ActivationAnnealer(model, originals, anneal_fraction=0.3)
    with pytest.raises(RuntimeError, match="total_steps"):
        annealer.step()
    annealer.on_step(0, total_steps=10)  # as a training loop does before its first step
    assert annealer.anneal_steps == 3
    annealer.on_step(2)
    state = annealer.state_dict()
    assert json.loads(json.dumps(state)) == {
        "current_step": 2,
        "total_steps": 10,
        "anneal_fraction": 0.3,
        "mode": "blend",
    }
    resumed_model = tiny_bert(layers=1)
    resumed_originals = conversion.original_activations(resumed_model)
    patch_model(resumed_model)
    resumed = conversion.ActivationAnnealer(resumed_model, resumed_originals)
    resumed.load_state_dict(state)
    assert resumed.mix == annealer.mix == pytest.approx(2 / 3)
    resumed.step()
    assert resumed.finished
    annealer.finish()  # stopping early still leaves pure HeLU
    assert annealer.finished
    assert not model.encoder.layer[0].intermediate.intermediate_act_fn._forward_hooks


def test_trainer_callback_drives_annealing(tmp_path):
    from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    config = copy.deepcopy(tiny_bert().config)
    config.num_labels = 2
    model = BertForSequenceClassification(config)
    result = conversion.convert_model(model, "anneal", anneal_fraction=0.5)
    annealer = result.annealer
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(annealer.mix)

    rows = [
        {"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": i % 2}
        for b in random_batches(count=2)
        for i in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[annealer.callback(), Record()])
    trainer.train()
    assert seen == [0.5, 1.0, 1.0, 1.0]
    assert annealer.finished
