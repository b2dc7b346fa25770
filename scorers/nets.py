"""The torch.nn.Module subclasses the scorers train.

They live apart from their step modules because a class's base is needed when the class is defined: a step module
that defined them would import torch when config validation imports it (scorers/lazy.py). Imported when a scorer runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchedHeads", "WeightNet"]


class BatchedHeads(nn.Module):
    """``S × K`` independent proxy heads (seed × fold) held as stacked tensors and trained in one pass.

    Weights are laid out ``[D, S, K, ·]`` so one GEMM evaluates every head on a shared batch.
    """

    def __init__(
        self, kind: str, n_seeds: int, n_folds: int, dim: int, n_classes: int, hidden: int, init_seeds: list[int]
    ) -> None:
        super().__init__()
        self.kind = kind
        self.n_seeds, self.n_folds, self.n_classes, self.hidden = n_seeds, n_folds, n_classes, hidden

        gens = [torch.Generator().manual_seed(init_seeds[s]) for s in range(n_seeds)]

        def stacked(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
            # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), each seed from its own stream.
            bound = 1.0 / math.sqrt(fan_in)
            parts = []
            for s in range(n_seeds):
                parts.append((torch.rand((n_folds, *shape), generator=gens[s]) * 2 - 1) * bound)
            return nn.Parameter(torch.stack(parts))  # [S, K, *shape]

        if kind == "linear":
            self.w = nn.Parameter(stacked((dim, n_classes), dim).data.permute(2, 0, 1, 3).contiguous())
            self.b = stacked((n_classes,), dim)
        else:
            self.w1 = nn.Parameter(stacked((dim, hidden), dim).data.permute(2, 0, 1, 3).contiguous())
            self.b1 = stacked((hidden,), dim)
            self.w2 = stacked((hidden, n_classes), hidden)
            self.b2 = stacked((n_classes,), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, D]`` shared batch → logits ``[B, S, K, C]`` for every head."""
        b, d = x.shape
        s, k, c = self.n_seeds, self.n_folds, self.n_classes
        if self.kind == "linear":
            return (x @ self.w.view(d, -1)).view(b, s, k, c) + self.b
        h = self.hidden
        z = torch.relu((x @ self.w1.view(d, -1)).view(b, s, k, h) + self.b1)
        out = torch.bmm(z.view(b, s * k, h).transpose(0, 1), self.w2.view(s * k, h, c))  # [S*K, B, C]
        return out.transpose(0, 1).reshape(b, s, k, c) + self.b2

    def score_one(
        self, s: int, k: int, x: torch.Tensor, y: torch.Tensor, grand_params: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head ``(s, k)`` on rows ``x`` ``[R, D]`` → (logits, EL2N, GraNd), GraNd in closed form."""
        onehot = F.one_hot(y, num_classes=self.n_classes).to(x.dtype)
        x_sq = x.pow(2).sum(1)
        if self.kind == "linear":
            logits = x @ self.w[:, s, k] + self.b[s, k]
            err = torch.softmax(logits, dim=1) - onehot
            el2n = err.norm(dim=1)
            return logits, el2n, el2n * torch.sqrt(x_sq + 1.0)
        pre = x @ self.w1[:, s, k] + self.b1[s, k]
        z = torch.relu(pre)
        logits = z @ self.w2[s, k] + self.b2[s, k]
        err = torch.softmax(logits, dim=1) - onehot
        el2n = err.norm(dim=1)
        # d loss / d (w2, b2) = (z ⊗ err, err)  →  ‖err‖² (‖z‖² + 1)
        sq = el2n.pow(2) * (z.pow(2).sum(1) + 1.0)
        if grand_params == "all":
            # d loss / d (w1, b1) = (x ⊗ delta, delta), delta = (err W2ᵀ) ⊙ relu'(pre)
            delta = (err @ self.w2[s, k].T) * (pre > 0).to(x.dtype)
            sq = sq + delta.pow(2).sum(1) * (x_sq + 1.0)
        return logits, el2n, torch.sqrt(sq)


class WeightNet(nn.Module):
    """Meta-Weight-Net: per-sample loss ``[B, 1]`` -> weight in (0, 1) ``[B, 1]`` (1 -> hidden -> 1, sigmoid)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(loss))
