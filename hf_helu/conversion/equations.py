"""The normal equations of a ridge least-squares fit, accumulated batch by batch in float64."""

from __future__ import annotations

import math

import torch


class NormalEquations:
    """Gram matrix ``X^T X``, cross term ``X^T Y`` and target energy of a least-squares fit, in float64."""

    def __init__(self, inputs: int, outputs: int, bias: bool, device: torch.device):
        features = inputs + int(bias)
        self.bias, self.device = bias, device
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(features, outputs, dtype=torch.float64, device=device)
        self.target_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, inputs) and their targets (tokens, outputs)."""
        x = x.to(self.device, torch.float64)
        target = target.to(self.device, torch.float64)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += x.T @ x
        self.cross += x.T @ target
        self.target_energy += target.square().sum()
        self.tokens += x.shape[0]

    def solve(self, original: torch.Tensor, ridge: float) -> torch.Tensor:
        """The fitted (inputs [+ 1], outputs) parameters, ridge-penalised towards ``original``."""
        if ridge == 0:
            return torch.linalg.lstsq(self.gram, self.cross).solution
        # Ridge towards the original weights (the bias is not penalised): units that rarely fire on the
        # calibration tokens keep their pretrained weights instead of being pulled to zero.
        penalty = torch.full((self.gram.shape[0],), ridge * self.tokens, dtype=torch.float64, device=self.device)
        if self.bias:
            penalty[-1] = 0
        return torch.linalg.solve(self.gram + torch.diag(penalty), self.cross + penalty[:, None] * original)

    def relative_error(self, theta: torch.Tensor) -> float:
        """``||X theta - Y|| / ||Y||`` over the accumulated tokens."""
        residual = (theta * (self.gram @ theta)).sum() - 2 * (theta * self.cross).sum() + self.target_energy
        return math.sqrt(max(residual.item(), 0.0) / max(self.target_energy.item(), 1e-300))
