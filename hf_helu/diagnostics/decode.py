"""Decode sparsity: the share of FFN activations at exactly 0 while a causal LM decodes greedily at batch 1.

That share, not the one over a whole evaluation block, is what :func:`hf_helu.sparse_inference` turns into speed:
each decode step runs the FFN on one row, and every zero in it is a unit whose up and down rows are not read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_helu.capture import ForwardCapture
from hf_helu.errors import UsageError
from hf_helu.families import find_activation_sites, unwrap_model


@torch.no_grad()
def decode_sparsity(
    model: nn.Module, prompts: Sequence[torch.Tensor] | torch.Tensor, new_tokens: int = 32
) -> dict[str, Any]:
    """Greedy-decode ``new_tokens`` tokens after each prompt (batch 1, EOS not stopping it) and count, over the FFN
    calls of one row (the decode steps; the prompt's own forward is left out unless it is one token), the share of
    activation outputs exactly 0.

    ``prompts``: 1-D token-id tensors, or the rows of a 2-D one. Returns ``{"zero_fraction", "layers"
    (per FFN site, in layer order), "rows" (decode rows per site), "prompts", "new_tokens"}``. The model is put in
    eval mode for the measurement and back in the mode it was in.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise UsageError(f"new_tokens must be an int >= 2 (the first comes from the prompt), got {new_tokens!r}")
    rows = [torch.as_tensor(p).reshape(-1) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("prompts must hold at least one non-empty prompt")
    inner = unwrap_model(model)
    sites = find_activation_sites(inner)
    if not sites:
        raise UsageError(f"no FFN activation found in {type(inner).__name__}")
    device = next(inner.parameters()).device
    zeros = torch.zeros(len(sites), dtype=torch.int64, device=device)
    elements = torch.zeros(len(sites), dtype=torch.int64, device=device)
    decode_rows = torch.zeros(len(sites), dtype=torch.int64)
    index = {site.name: i for i, site in enumerate(sites)}

    def count(name: str, args: tuple, output: torch.Tensor) -> None:
        if output.numel() == output.shape[-1]:  # one row: a batch-1 decode step
            i = index[name]
            zeros[i] += (output == 0).sum()
            elements[i] += output.numel()
            decode_rows[i] += 1

    was_training = inner.training
    inner.eval()
    pad = _pad_token_id(inner)
    try:
        with ForwardCapture({site.name: site.module for site in sites}, record=None, on_call=count):
            for prompt in rows:
                ids = prompt.to(device).unsqueeze(0)
                inner.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                )
    finally:
        inner.train(was_training)
    zeros, elements = zeros.cpu(), elements.cpu()
    layers = [(z / e).item() if e else None for z, e in zip(zeros, elements, strict=True)]
    total = int(elements.sum())
    return {
        "zero_fraction": int(zeros.sum()) / total if total else None,
        "layers": layers,
        "rows": decode_rows.tolist(),
        "prompts": len(rows),
        "new_tokens": new_tokens,
    }


def _pad_token_id(model: nn.Module) -> int:
    """The generation config's pad token, else its (first) EOS token, else 0 (batch 1 never pads)."""
    config = getattr(model, "generation_config", None)
    for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


__all__ = ["decode_sparsity"]
