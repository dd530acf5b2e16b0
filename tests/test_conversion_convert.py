"""One call (hf_helu.conversion.convert): errors, the patch it shares with the recipes, export to stock ReLU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conversion_helpers import random_batches, tiny_bert
from torch import nn

import hf_helu  # noqa: F401  (registers "helu")
from hf_helu import conversion
from hf_helu.activation import DEFAULT_ALPHA, HeLU, activation_name
from hf_helu.families import ActivationSite
from hf_helu.patching import export_for_inference


def test_convert_model_errors():
    with pytest.raises(ValueError, match="needs calibration_batches"):
        conversion.convert_model(tiny_bert(), "calibrate")
    with pytest.raises(ValueError, match="unknown conversion method"):
        conversion.convert_model(tiny_bert(), "calibrated", calibration_batches=random_batches())


def test_patch_activation_puts_helu_or_relu_into_the_same_modules():
    """relu is HeLU patched in then swapped for ReLU: the same modules and config attribute as helu."""
    helu_model, relu_model = tiny_bert(), tiny_bert()
    helu_report = conversion.patch_activation(helu_model, "helu", alpha=0.1)
    relu_report = conversion.patch_activation(relu_model, "relu", alpha=0.1)
    assert (helu_report.action, helu_report.activation) == ("patch", "helu_0.1")
    assert (relu_report.action, relu_report.activation) == ("unpatch", "relu")
    assert [c.name for c in relu_report.changed] == [c.name for c in helu_report.changed]
    assert helu_model.config.hidden_act == "helu_0.1" and relu_model.config.hidden_act == "relu"
    assert all(isinstance(m, HeLU) and m.alpha == 0.1 for m in original_modules(helu_model))
    assert all(type(m) is nn.ReLU for m in original_modules(relu_model))
    partial = tiny_bert()
    report = conversion.patch_activation(partial, "helu", scope=[1])
    assert [c.name for c in report.changed] == ["encoder.layer.1.intermediate.intermediate_act_fn"]
    assert report.activation == activation_name(DEFAULT_ALPHA)
    with pytest.raises(ValueError, match="'helu' or 'relu'"):
        conversion.patch_activation(tiny_bert(), "keep")


def original_modules(model):
    return [layer.intermediate.intermediate_act_fn for layer in model.encoder.layer]


def test_every_name_of_the_old_module_is_importable():
    names = [
        "ANNEAL_MODES",
        "CONVERSION_METHODS",
        "DEFAULT_ANNEAL_FRACTION",
        "DEFAULT_RIDGE",
        "ActivationAnnealer",
        "ActivationSpec",
        "AnnealingCallback",
        "CalibrationReport",
        "ConversionResult",
        "FFNDistiller",
        "LayerCalibration",
        "apply_conversion",
        "calibrate_ffn",
        "calibration_batches",
        "check_conversion_method",
        "convert_model",
        "dataset_batches",
        "ffn_output_errors",
        "ffn_sites",
        "original_activations",
    ]
    missing = [name for name in names if not hasattr(conversion, name)]
    assert not missing
    assert conversion.AnnealingCallback.__name__ == "AnnealingCallback"
    assert all(isinstance(site, ActivationSite) for site in conversion.ffn_sites(tiny_bert()))
    with pytest.raises(AttributeError):
        conversion.FFNSite  # noqa: B018  (one site type: hf_helu.families.ActivationSite)


def test_converted_model_exports_to_stock_relu(tmp_path):
    """calibrate+anneal, finish, export: the saved model loads and runs in a process without hf_helu."""
    model = tiny_bert()
    batches = random_batches()
    result = conversion.convert_model(model, "calibrate+anneal", calibration_batches=batches, total_steps=2)
    result.annealer.step()
    result.annealer.step()
    assert result.annealer.finished
    assert result.to_dict()["calibration"]["layers"][0]["tokens"] > 0
    export_for_inference(model)
    model.save_pretrained(tmp_path / "model")
    batch = batches[0]
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "model")!r}).eval()
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    out = model(**io["batch"]).last_hidden_state
assert torch.equal(out, io["expected"]), (out - io["expected"]).abs().max()
assert model.config.hidden_act == "relu", model.config.hidden_act
assert "hf_helu" not in sys.modules
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
