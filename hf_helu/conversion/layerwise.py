"""Running a model one block at a time on cached hidden states, as sequential (GPTQ-style) calibration does.

Calibrating layer ``l`` needs the inputs that the already converted layers ``0..l-1`` produce. Re-running the
model from the embeddings for every layer costs ``O(depth^2)`` block passes; caching the hidden states between
blocks makes it ``O(depth)``: the inputs of block ``l + 1`` are the outputs of one pass through block ``l``.

:func:`capture_block_inputs` runs the model once per batch with a forward pre-hook on every block of the layer
stack that holds the FFN sites, keeping the first block's hidden states and every block's other arguments
(attention mask, position embeddings, ...: per block, since e.g. Qwen2 gives sliding-window layers another mask).
Only the first block computes: the others pass their input through (what they compute is not needed yet), and the
forward stops at the first module called after the last block, so the model's head never runs either. It also
checks that the blocks form a chain: each runs once, in stack order, and takes the previous block's output as its
hidden states. Models for which this does not hold raise :class:`NotSequential` and are calibrated by re-running
the model per layer instead: encoder-decoders (Whisper, T5: two stacks), shared layers run several times (ALBERT),
a block with two FFN sites, or anything done to the hidden states between blocks.

Memory: the hidden states of every calibration batch at one depth (``tokens x hidden size`` values, and one batch's
more while a block turns them into the next block's inputs; twice that with calibration target ``"model"``, which
carries the original model's hidden states along), plus references to each block's other arguments, which the
model shares between blocks (one attention mask and one set of position embeddings per batch and mask type).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_helu.families import ActivationSite


class NotSequential(Exception):
    """The model's blocks cannot be run one at a time on cached hidden states; the message says why."""


class _Stop(Exception):
    """Raised in the last block's pre-hook: everything needed has been captured."""


@dataclass
class BlockCall:
    """The arguments of one block call, without the hidden states."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.hidden_in_kwargs:
            return block(*self.args, hidden_states=hidden, **self.kwargs)
        return block(hidden, *self.args, **self.kwargs)


@dataclass
class BlockStack:
    """The layer stack (a ``ModuleList``) holding the FFN sites: its blocks, and the site of each block (or None)."""

    name: str
    blocks: list[nn.Module]
    sites: list[ActivationSite | None]


def _stack_of(name: str) -> tuple[str, int] | None:
    """(stack name, block index) for a module name, from its first numeric part."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def block_stack(model: nn.Module, sites: Sequence[ActivationSite]) -> BlockStack:
    """The one layer stack holding every site, one site per block; :class:`NotSequential` otherwise."""
    located = [_stack_of(site.name) for site in sites]
    if any(place is None for place in located):
        raise NotSequential("an FFN site is not inside a numbered layer stack")
    stacks = sorted({stack for stack, _ in located})
    if len(stacks) != 1:
        raise NotSequential(f"FFN sites lie in {len(stacks)} layer stacks ({', '.join(stacks)})")
    stack = model.get_submodule(stacks[0])
    if not isinstance(stack, nn.ModuleList):
        raise NotSequential(f"{stacks[0]} is a {type(stack).__name__}, not a ModuleList of blocks")
    by_block: list[ActivationSite | None] = [None] * len(stack)
    for site, (_, index) in zip(sites, located, strict=True):
        if by_block[index] is not None:
            raise NotSequential(f"block {stacks[0]}.{index} holds more than one FFN site")
        by_block[index] = site
    return BlockStack(stacks[0], list(stack), by_block)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The hidden states a block returns: the output itself, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    return None


def _with_first(template: Any, hidden: torch.Tensor) -> Any:
    """A block output shaped like ``template`` (a block's real output) whose hidden states are ``hidden``."""
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, tuple):
        return (hidden, *template[1:])
    raise NotSequential(f"a block returns a {type(template).__name__}, expected a tensor or a tuple")


def without_cache(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with ``use_cache=False`` when the model takes it: a KV cache would grow at every block re-run."""
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    if "use_cache" in accepted and "use_cache" not in batch:
        return {**batch, "use_cache": False}
    return batch


class _ChainRecorder:
    """Pre- and post-hooks on every block of a stack, recording one forward's block calls and checking the chain."""

    def __init__(self, stack: BlockStack):
        self.stack = stack
        self.calls: list[BlockCall | None] = [None] * len(stack.blocks)
        self.hidden: torch.Tensor | None = None
        self.previous_output: torch.Tensor | None = None
        self.template: Any = None  # the first block's real output
        self.done = False  # the last block has run
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self.any_before)]
        self.replaced: list[tuple[nn.Module, Any]] = []
        for index, block in enumerate(stack.blocks):
            self.handles.append(
                block.register_forward_pre_hook(lambda m, a, k, i=index: self.before(i, a, k), with_kwargs=True)
            )
            self.handles.append(block.register_forward_hook(lambda m, a, o, i=index: self.after(i, o)))
            if index > 0:
                self.replaced.append((block, block.__dict__.get("forward")))
                block.forward = self.pass_through

    def before(self, index: int, args: tuple, kwargs: dict[str, Any]) -> None:
        where = f"{self.stack.name}.{index}"
        if self.calls[index] is not None:
            raise NotSequential(f"block {where} runs more than once per forward")
        if index > 0 and self.calls[index - 1] is None:
            raise NotSequential(f"block {where} runs before block {index - 1}")
        kwargs = dict(kwargs)
        hidden_in_kwargs = not args
        hidden = kwargs.pop("hidden_states", None) if hidden_in_kwargs else args[0]
        if not isinstance(hidden, torch.Tensor):
            raise NotSequential(f"block {where} does not take its hidden states as its first argument")
        if any(type(value).__name__.endswith("Cache") for value in (*args, *kwargs.values())):
            raise NotSequential(f"block {where} is given a KV cache")
        if index == 0:
            self.hidden = hidden
        elif hidden is not self.previous_output:
            raise NotSequential(f"block {where} does not take the output of block {index - 1} as its input")
        self.calls[index] = BlockCall(tuple(args[1:]), kwargs, hidden_in_kwargs)

    def any_before(self, module: nn.Module, args: tuple) -> None:
        """Global pre-hook: the first module to run after the last block (a final norm, a head) ends the forward."""
        if self.done and not any(module is block for block in self.stack.blocks):
            raise _Stop

    def after(self, index: int, output: Any) -> None:
        self.previous_output = first_tensor(output)
        if self.previous_output is None:
            raise NotSequential(f"block {self.stack.name}.{index} returns no hidden-states tensor")
        if index == 0:
            self.template = output
        self.done = index == len(self.stack.blocks) - 1

    def pass_through(self, *args: Any, **kwargs: Any) -> Any:
        """Stand-in forward of the blocks after the first: their input, shaped like the first block's output."""
        return _with_first(self.template, args[0] if args else kwargs["hidden_states"])

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        for block, forward in self.replaced:
            if forward is None:
                del block.forward
            else:  # an instance-level forward was there before (accelerate's offload hooks put one)
                block.forward = forward
        self.replaced.clear()


@dataclass
class CachedBatch:
    """One calibration batch at some depth: its inputs, the hidden states entering the current block, and every
    block's other arguments."""

    batch: dict[str, Any]
    hidden: torch.Tensor
    calls: list[BlockCall]


def capture_block_inputs(model: nn.Module, stack: BlockStack, batch: dict[str, Any]) -> CachedBatch:
    """One forward of ``batch``, stopped after the last block: the first block's hidden states and every
    block's arguments. :class:`NotSequential` when the blocks do not form a chain."""
    recorder = _ChainRecorder(stack)
    try:
        model(**without_cache(model, batch))
    except _Stop:
        pass
    finally:
        recorder.remove()
    missing = [i for i, call in enumerate(recorder.calls) if call is None]
    if missing:
        raise NotSequential(f"block(s) {missing} of {stack.name} did not run in a forward pass")
    return CachedBatch(batch, recorder.hidden, recorder.calls)


def advance(stack: BlockStack, index: int, cached: Sequence[CachedBatch]) -> None:
    """Replace every batch's hidden states by block ``index``'s output on them (one pass through the block)."""
    block = stack.blocks[index]
    for item in cached:
        item.hidden = first_tensor(item.calls[index].run(block, item.hidden))


__all__ = [
    "BlockCall",
    "BlockStack",
    "CachedBatch",
    "NotSequential",
    "advance",
    "block_stack",
    "capture_block_inputs",
    "first_tensor",
    "without_cache",
]
