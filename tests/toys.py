"""Tiny models shared by the unit tests (as Torch-Pruning keeps its toy nets in one place)."""

from __future__ import annotations

import torch
from torch import nn

from rclib.models import from_spec

# A VGG16-topology net for 1x8x8 inputs and 10 classes, small enough to train in a second.
SPEC = dict(model="vgg_small", width=8, hidden=32, batch_norm=True, dropout=0.0, num_classes=10,
            input_shape=[1, 8, 8], mean=[0.5], std=[0.5])


def tiny_vgg(seed: int = 0, **changes) -> nn.Module:
    """``SPEC`` built with ``seed`` (fields overridden by ``changes``)."""
    torch.manual_seed(seed)
    return from_spec({**SPEC, **changes})
