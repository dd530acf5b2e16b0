"""A model operation that fails leaves the model as it was: modules, parameters, buffers, config, flags.

:func:`restore_on_error` records, before the operation, every module's children (by reference: a swapped module is
put back), every parameter's and buffer's tensor (by reference: a cast or a ``.data =`` swap is undone; tensors the
operation writes *in place* are cloned, when named in ``in_place``), the config's attributes, the training flags and
the model's quantizer marker. On an exception inside the block all of it is put back and the exception goes on.
Recording costs references only, plus the clones asked for.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_MISSING = object()
_MODEL_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method")


def _config_states(config: object, seen: set[int] | None = None) -> list[tuple[object, dict]]:
    """(config, copy of its attributes) for ``config`` and every sub-config in it (kept by reference, as the
    model's submodules may hold them)."""
    seen = set() if seen is None else seen
    if config is None or not hasattr(config, "__dict__") or id(config) in seen:
        return []
    seen.add(id(config))
    states, attributes = [], {}
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "__dict__"):  # a sub-config
            attributes[key] = value
            states += _config_states(value, seen)
        else:
            attributes[key] = copy.deepcopy(value)
    return [(config, attributes), *states]


class _Snapshot:
    def __init__(self, model: nn.Module, in_place: Iterable[str]):
        in_place = set(in_place)
        self.model = model
        self.modules = list(model.modules())
        self.children = [(module, dict(module._modules)) for module in self.modules]
        self.training = [(module, module.training) for module in self.modules]
        self.tensors: list[tuple] = []
        self.clones: dict[str, torch.Tensor] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    full = f"{prefix}.{name}" if prefix else name
                    data = None if tensor is None else tensor.data
                    clone = data.clone() if data is not None and full in in_place else None
                    if clone is not None:
                        self.clones[full] = clone
                    self.tensors.append((module, kind, name, tensor, data, clone))
        self.configs = _config_states(getattr(model, "config", None))
        self.attrs = {name: model.__dict__.get(name, _MISSING) for name in _MODEL_ATTRS}

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        with torch.no_grad():
            for module, kind, name, tensor, data, clone in self.tensors:
                getattr(module, kind)[name] = tensor
                if tensor is None:
                    continue
                tensor.data = data
                if clone is not None:
                    data.copy_(clone)
        for module, training in self.training:
            module.training = training
        for config, attributes in self.configs:
            config.__dict__.clear()
            config.__dict__.update(attributes)
        for name, value in self.attrs.items():
            if value is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = value


@contextlib.contextmanager
def restore_on_error(model: nn.Module, in_place: Iterable[str] = ()) -> Iterator[_Snapshot]:
    """Inside the block, any exception restores ``model`` as it was at entry (see the module docstring).

    ``in_place``: names of parameters/buffers the block may modify in place (``tensor.copy_``), cloned at entry;
    the yielded snapshot's ``clones`` maps them to their copies (read-only use: the values before the block).
    """
    snapshot = _Snapshot(model, in_place)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


__all__ = ["restore_on_error"]
