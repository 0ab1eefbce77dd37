"""Wall-clock latency of a model's forward pass, measured the same way for every variant.

Used by chapter 01 (Figure 4: unpruned vs masked vs hardened) and by ``bench/``.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 20,
            warmup: int = 3) -> float:
    """Median seconds of one forward pass on a random batch, in eval mode.

    Args:
        model: any module; its device is used, and its train/eval mode is restored afterwards.
        input_shape: (C, H, W) of one example.
        batch: examples per forward pass.
        repeats: timed passes (median reported, robust to a busy machine); warmup: untimed ones.

    Returns:
        Seconds per forward pass (median).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.rand(batch, *input_shape, device=device, generator=None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)
