"""What conversion and diagnostics read off a forward pass: hooked modules' inputs/outputs, and padding masks.

* :class:`ForwardCapture` puts one forward hook on each of a set of modules and, for every call while it is
  ``active``, counts the call, keeps the latest output (or first input) and runs an optional callback whose
  return value replaces the module's output. Calibration, its error measure, distillation and the dead-unit
  monitor all hook modules through it.
* :func:`token_mask` turns a padding mask (``attention_mask``: 1 = real position) into the boolean mask of the
  positions of one activation tensor, when the two match one to one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# on_call(key, args, output) -> None, or the tensor that replaces the module's output.
OnCall = Callable[[Hashable, tuple, Any], Any]
RECORDS = ("output", "input", None)


def submodules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{name: model.get_submodule(name)}`` for each of ``names``, in order."""
    return {name: model.get_submodule(name) for name in names}


class ForwardCapture:
    """Forward hooks on ``modules`` (a mapping from any key, usually a module name, to the module).

    While ``active`` (toggle it to keep hooks registered but idle), every call of a hooked module:

    * counts in ``calls[key]``; ``order`` lists the keys in the order they first ran;
    * is kept in ``records[key]``: the latest output (``record="output"``), the latest first positional
      input (``record="input"``) or nothing (``record=None``);
    * runs ``on_call(key, args, output)``; a value it returns replaces the module's output.

    The hooks stay until :meth:`remove` (or the end of a ``with`` block). :meth:`clear` forgets the
    records and counts in place (``records`` stays the same dict).
    """

    def __init__(
        self,
        modules: Mapping[Hashable, nn.Module],
        *,
        record: str | None = "output",
        on_call: OnCall | None = None,
        active: bool = True,
    ):
        if record not in RECORDS:
            raise ValueError(f"record must be one of {RECORDS}, got {record!r}")
        self.record = record
        self.on_call = on_call
        self.active = active
        self.records: dict[Hashable, Any] = {}
        self.calls: dict[Hashable, int] = {}
        self.order: list[Hashable] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for key, module in modules.items():
                self._handles.append(module.register_forward_hook(functools.partial(self._hook, key)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, key: Hashable, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.active:
            return None
        if key not in self.calls:
            self.order.append(key)
            self.calls[key] = 0
        self.calls[key] += 1
        if self.record == "output":
            self.records[key] = output
        elif self.record == "input":
            self.records[key] = args[0] if args else None
        return None if self.on_call is None else self.on_call(key, args, output)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        """Forget what was recorded and counted (the hooks stay)."""
        self.records.clear()
        self.calls.clear()
        self.order.clear()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> ForwardCapture:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def token_mask(mask: object, positions: Sequence[int], device: torch.device | None = None) -> torch.Tensor | None:
    """``mask`` as a bool tensor on ``device`` when it has one entry per position, else None.

    ``positions`` is the shape of the activations without their features dim (``(batch, seq)`` for a
    ``(batch, seq, features)`` tensor). A padding mask applies only to activations whose positions it matches
    one to one; callers decide what a mismatch means (an error, or counting every position).
    """
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(positions):
        return None
    return mask.to(device=device, dtype=torch.bool)
