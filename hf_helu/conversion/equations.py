"""The normal equations of a ridge least-squares fit, accumulated batch by batch, solved in float64.

Each batch's ``X^T X`` and ``X^T Y`` are float32 matmuls as the tokens arrive (no activation is kept): a float32
matmul runs at twice the float64 rate on CPUs and GPUs, and its rounding (about ``sqrt(batch tokens) * 6e-8``
relative to each entry, 4e-6 for a batch of 4,096 tokens) is far below the fit errors calibration works at (1e-2).
The batches are summed in float64, where the solve and the error measure (which cancels) also run.
"""

from __future__ import annotations

import math

import torch

GRAM_BLOCKS = 4  # column blocks of gram_matrix: 10 of 16 block products, 62.5% of the full product's work


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """``x.T @ x`` from the blocks on and above its diagonal, each mirrored below: it is symmetric, so a third of
    the multiply-adds of the full product are not needed (the largest matmul of a calibration after the model)."""
    n = x.shape[1]
    size = -(-n // GRAM_BLOCKS)
    gram = x.new_empty(n, n)
    for start in range(0, n, size):
        rows = x[:, start : start + size].T @ x[:, start:]
        gram[start : start + size, start:] = rows
        gram[start + size :, start : start + size] = rows[:, size:].T
    return gram


class NormalEquations:
    """Gram matrix ``X^T X``, cross term ``X^T Y`` and target energy of a least-squares fit (float64 sums of
    ``dtype`` products)."""

    def __init__(self, inputs: int, outputs: int, bias: bool, device: torch.device, dtype: torch.dtype = torch.float32):
        features = inputs + int(bias)
        self.bias, self.device, self.dtype = bias, device, dtype
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(features, outputs, dtype=torch.float64, device=device)
        self.target_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, inputs) and their targets (tokens, outputs)."""
        x = x.to(self.device, self.dtype)
        target = target.to(self.device, self.dtype)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += gram_matrix(x).double()
        self.cross += (x.T @ target).double()
        self.target_energy += target.double().square().sum()
        self.tokens += x.shape[0]

    def solve(self, original: torch.Tensor, ridge: float) -> torch.Tensor:
        """The fitted (inputs [+ 1], outputs) parameters in float64, ridge-penalised towards ``original``."""
        gram, cross = self.gram, self.cross
        if ridge == 0:
            return torch.linalg.lstsq(gram, cross).solution
        # Ridge towards the original weights (the bias is not penalised): units that rarely fire on the
        # calibration tokens keep their pretrained weights instead of being pulled to zero.
        penalty = torch.full((gram.shape[0],), ridge * self.tokens, dtype=torch.float64, device=self.device)
        if self.bias:
            penalty[-1] = 0
        system, right = gram + torch.diag(penalty), cross + penalty[:, None] * original
        factor, info = torch.linalg.cholesky_ex(system)  # positive definite with a ridge: half LU's work
        if info.item() == 0:
            return torch.cholesky_solve(right, factor)
        return torch.linalg.solve(system, right)  # an unpenalised bias column can leave it semidefinite

    def relative_error(self, theta: torch.Tensor) -> float:
        """``||X theta - Y|| / ||Y||`` over the accumulated tokens."""
        gram, cross = self.gram, self.cross
        residual = (theta * (gram @ theta)).sum() - 2 * (theta * cross).sum() + self.target_energy
        return math.sqrt(max(residual.item(), 0.0) / max(self.target_energy.item(), 1e-300))
