"""Distillation during fine-tuning: every FFN block's output pulled toward the frozen original's."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hf_helu.capture import ForwardCapture, submodules, token_mask
from hf_helu.conversion.batches import model_inputs
from hf_helu.conversion.sites import ffn_sites
from hf_helu.families import unwrap_model


class FFNDistiller:
    """Feature distillation from a frozen copy of the original model, as an extra fine-tuning loss.

    The original checkpoint has no trained task head, so its logits carry nothing to distil; its FFN
    blocks do. On each batch the teacher (the unpatched model, frozen, in eval mode) runs first, then
    the student; forward hooks on every FFN output projection of both collect their outputs, and::

        loss = student_loss + weight * mean over FFN blocks of  sum ||s - t||^2 / sum ||t||^2

    with the sums over the non-padding tokens (a relative squared error, so every layer counts alike).
    Use it as the training loss, ``loss = distiller(model, batch)``, as
    ``fit(..., hooks=FitHooks(compute_loss=distiller))``
    does. ``teacher_context`` wraps the teacher's forward (e.g. ``accelerator.autocast``). The hooks
    stay until :meth:`remove`; they record only inside the call (evaluation forwards store nothing).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        *,
        teacher_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
            raise ValueError(f"distillation weight must be a finite number > 0, got {weight!r}")
        self.weight = float(weight)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_context = teacher_context
        self.projections = [site.output_projection for site in ffn_sites(student)]
        teacher_projections = [site.output_projection for site in ffn_sites(teacher)]
        if teacher_projections != self.projections:
            raise ValueError(
                f"student and teacher have different FFN blocks: {self.projections} vs {teacher_projections}"
            )
        self._captures = {
            role: ForwardCapture(submodules(unwrap_model(model), self.projections), active=False)
            for role, model in (("student", student), ("teacher", teacher))
        }
        self._outputs: dict[str, dict[str, torch.Tensor]] = {role: c.records for role, c in self._captures.items()}
        self.last_distillation: torch.Tensor | None = None  # the unweighted term of the last call

    def _record(self, on: bool) -> None:
        for capture in self._captures.values():
            capture.active = on

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The student's loss on ``batch`` plus ``weight`` times the distillation term."""
        self._record(True)
        try:
            with torch.no_grad(), self.teacher_context():
                self.teacher(**model_inputs(batch))
            outputs = model(**batch)
        finally:
            self._record(False)
        terms = [self._term(name, batch.get("attention_mask")) for name in self.projections]
        for capture in self._captures.values():
            capture.clear()  # a projection that does not run next time must not find this batch's output
        distillation = torch.stack(terms).mean()
        self.last_distillation = distillation.detach()
        return outputs.loss + self.weight * distillation

    def _term(self, name: str, attention_mask: Any) -> torch.Tensor:
        """``sum ||s - t||^2 / sum ||t||^2`` of one output projection, over the non-padding tokens."""
        student, teacher = self._outputs["student"].get(name), self._outputs["teacher"].get(name)
        if student is None or teacher is None:
            missing = "student" if student is None else "teacher"
            raise RuntimeError(f"FFN output projection {name!r} did not run in the {missing}'s forward")
        student, teacher = student.float(), teacher.float()
        keep = token_mask(attention_mask, student.shape[:-1], student.device)
        if keep is not None:
            student, teacher = student[keep], teacher[keep]
        return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)

    def remove(self) -> None:
        """Remove the hooks from student and teacher."""
        for capture in self._captures.values():
            capture.remove()
