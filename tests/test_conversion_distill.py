"""Distillation (hf_helu.conversion.distill): the loss term against one computed from plain hooks, and its effect."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conversion_helpers import random_batches, tiny_classifier
from torch import nn

import hf_helu  # noqa: F401  (registers "helu")
from hf_helu import conversion
from hf_helu.patching import patch_model


def ffn_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Each layer's FFN output projection output, by plain hooks (independent of the distiller)."""
    found, handles = [], []
    for layer in model.bert.encoder.layer:
        handles.append(layer.output.dense.register_forward_hook(lambda m, a, out: found.append(out.detach())))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return [out.numpy().astype(np.float64) for out in found]


def test_distiller_adds_the_relative_ffn_error_to_the_loss():
    student = tiny_classifier()
    teacher = copy.deepcopy(student)
    batch = {**random_batches(1)[0], "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    same = conversion.FFNDistiller(student, teacher, weight=3.0)
    loss = same(student, batch)
    assert same.last_distillation.item() == 0.0  # the unpatched student is the teacher
    assert torch.equal(loss, student(**batch).loss)
    same.remove()

    patch_model(student)
    distiller = conversion.FFNDistiller(student, teacher, weight=3.0)
    loss = distiller(student, batch)
    keep = batch["attention_mask"].bool().numpy()
    terms = [
        ((s[keep] - t[keep]) ** 2).sum() / (t[keep] ** 2).sum()
        for s, t in zip(ffn_outputs(student, batch), ffn_outputs(teacher, batch), strict=True)
    ]
    assert terms[0] > 0
    np.testing.assert_allclose(distiller.last_distillation.item(), np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(loss.item(), student(**batch).loss.item() + 3.0 * np.mean(terms), rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen
    with torch.no_grad():
        student(**batch)  # an evaluation forward outside the loss keeps no FFN outputs alive
    assert not any(distiller._outputs.values())
    assert student.bert.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
    distiller.remove()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_distillation_pulls_ffn_outputs_toward_the_teacher():
    """Fine-tuning moves the FFN outputs away from the original's; the distillation term holds them closer."""
    batch = {**random_batches(1)[0], "labels": torch.zeros(8, dtype=torch.long)}
    errors = {}
    for weight in (None, 1.0):
        student = tiny_classifier()
        teacher = copy.deepcopy(student)
        patch_model(student)
        distiller = conversion.FFNDistiller(student, teacher, weight=weight or 1.0)
        optimizer = torch.optim.Adam(student.bert.parameters(), lr=3e-3)
        history = []
        for _ in range(6):
            loss = distiller(student, batch)
            history.append(distiller.last_distillation.item())
            (loss if weight else student(**batch).loss).backward()
            optimizer.step()
            optimizer.zero_grad()
        errors[weight] = history
    assert errors[1.0][0] == errors[None][0] > 0  # same start
    assert errors[1.0][-1] < 0.5 * errors[None][-1]


def test_distiller_errors():
    student = tiny_classifier()
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="distillation weight must be a finite number > 0"):
            conversion.FFNDistiller(student, copy.deepcopy(student), weight=bad)
    shallow = copy.deepcopy(student)
    del shallow.bert.encoder.layer[1]
    with pytest.raises(ValueError, match="different FFN blocks"):
        conversion.FFNDistiller(student, shallow)
