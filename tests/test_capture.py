"""ForwardCapture and token_mask (hf_helu.capture), the hooks and masks conversion and diagnostics share."""

import pytest
import torch
from torch import nn

from hf_helu.capture import ForwardCapture, submodules, token_mask


def two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_records_outputs_counts_calls_and_order():
    model = two_layer_model()
    x = torch.randn(5, 3)
    with ForwardCapture(submodules(model, ["2", "0"])) as capture:
        out = model(x)
        model(x)
    assert capture.order == ["0", "2"]  # execution order, not the order given
    assert capture.calls == {"0": 2, "2": 2}
    assert torch.equal(capture.records["2"], out) and torch.equal(capture.records["0"], model[0](x))
    assert not capture.attached and not any(m._forward_hooks for m in model.modules())


def test_records_inputs_or_nothing():
    model = two_layer_model()
    x = torch.randn(5, 3)
    with ForwardCapture(submodules(model, ["1"]), record="input") as inputs:
        model(x)
    assert torch.equal(inputs.records["1"], model[0](x))
    with ForwardCapture(submodules(model, ["1"]), record=None) as nothing:
        model(x)
    assert nothing.records == {} and nothing.calls == {"1": 1}
    with pytest.raises(ValueError, match="record must be one of"):
        ForwardCapture({}, record="both")


def test_on_call_can_replace_the_output_and_keys_can_be_any_object():
    model = two_layer_model()
    x = torch.randn(5, 3)
    key = object()
    seen = []

    def on_call(name, args, output):
        seen.append(name)
        return torch.zeros_like(output)

    with ForwardCapture({key: model[1]}, on_call=on_call) as capture:
        out = model(x)
    assert seen == [key] and capture.calls == {key: 1}
    assert torch.equal(out, model[2](torch.zeros(5, 4)))  # the ReLU's output was replaced


def test_inactive_hooks_record_nothing_until_switched_on_and_clear_keeps_the_dict():
    model = two_layer_model()
    capture = ForwardCapture(submodules(model, ["2"]), active=False)
    model(torch.randn(2, 3))
    assert capture.records == {} and capture.calls == {} and capture.attached
    records = capture.records
    capture.active = True
    model(torch.randn(2, 3))
    assert list(records) == ["2"]
    capture.clear()
    assert capture.records is records and records == {} and capture.order == []
    capture.remove()
    capture.remove()  # idempotent
    assert not model[2]._forward_hooks


def test_token_mask_matches_positions_one_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    matched = token_mask(mask, torch.Size([2, 3]), torch.device("cpu"))
    assert matched.dtype == torch.bool and matched.tolist() == [[True, True, False], [True, False, False]]
    assert token_mask(mask, (2, 4)) is None  # other positions (e.g. a decoder layer)
    assert token_mask(mask, (2,)) is None
    assert token_mask(None, (2, 3)) is None and token_mask([[1, 1, 0], [1, 0, 0]], (2, 3)) is None
