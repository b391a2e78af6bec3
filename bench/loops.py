"""The baseline every training benchmark compares against: the plainest PyTorch loop."""
from __future__ import annotations

import time

import torch


def bare_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              batch_size: int, epochs: int) -> float:
    """Samples/s (best epoch) of shuffled mini-batches over pre-normalised in-memory tensors: no loader, no
    metrics, no checkpoints, no logging."""
    best = 0.0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        t0 = time.perf_counter()
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        best = max(best, len(y) / (time.perf_counter() - t0))
    return best
