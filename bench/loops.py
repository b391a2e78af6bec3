"""The baseline every training benchmark compares against: the plainest PyTorch loop."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from shared.parallel import prefetch


def bare_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int, epochs: int,
              loss_fn: Callable[[Any, tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
              ahead: bool = False, whole_epoch: bool = False) -> float:
    """Samples/s (best epoch) of shuffled mini-batches over pre-normalised in-memory tensors: no loader, no
    metrics, no checkpoints, no logging. ``y`` is one target tensor (cross-entropy) or several, which
    ``loss_fn(output, targets)`` combines (multi-task models). ``ahead`` gathers the next batches in a
    background thread (large inputs: the gather is a sizeable copy, which the platform overlaps too).
    ``whole_epoch`` shuffles the whole epoch in one gather and then takes contiguous slices (views): for
    small models the per-batch gather is a large share of the step, and one streaming gather is cheaper."""
    targets = y if isinstance(y, tuple) else (y,)
    loss_fn = loss_fn or (lambda out, t: torch.nn.functional.cross_entropy(out, t[0]))
    best = 0.0
    model.train()
    for _ in range(epochs):
        n = len(targets[0])
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        if whole_epoch:
            xs, ts = x[perm], tuple(t[perm] for t in targets)
            batches = ((xs[i:i + batch_size], tuple(t[i:i + batch_size] for t in ts)) for i in range(0, n, batch_size))
        else:
            # index_select: the fastest row gather on CPU (x[idx] took 48 ms an MNIST epoch at batch 64, this 21).
            batches = ((x.index_select(0, idx), tuple(t.index_select(0, idx) for t in targets))
                       for idx in perm.split(batch_size))
        for xb, tb in prefetch(batches, depth=2) if ahead else batches:
            loss = loss_fn(model(xb), tb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        best = max(best, n / (time.perf_counter() - t0))
    return best
