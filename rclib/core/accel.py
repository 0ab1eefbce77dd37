"""How batches reach the device and how they are computed there: copies, layout, precision.

None of this changes what the paper's algorithms compute; it changes how fast a GPU computes it.
Every setting is explicit: the loops of :mod:`rclib.nn.train`, :mod:`rclib.robust.attacks` and
:mod:`rclib.robust.margin` take a :class:`Runtime` keyword (``runtime=``), and its default is exactly
the plain fp32, NCHW, blocking-copy code that CPU runs have always used, so CPU results stay
bit-identical to runs without it. The device still comes from the model.

* **Asynchronous copies** (``non_blocking``): a host-to-GPU copy from page-locked memory can
  overlap the previous batch's compute. It is used only when the loader pins its batches
  (``loader.pin_memory``), the one case where asynchronous copies are both safe and useful.
* **channels_last** (NHWC): cuDNN's tensor-core convolutions want it; a model converted with
  :func:`prepare` computes the same function (a test checks outputs on the CPU), and inputs are
  copied into the same layout so no convolution converts them again.
* **bf16 autocast**: matrix products and convolutions in bfloat16, reductions such as the loss in
  fp32 (``torch.autocast``). Under ``precision="auto"`` only on CUDA; ``"bf16"`` forces it, also
  on CPU, which is how the tests exercise it.
* **Attack gradients stay fp32.** Under bf16 autocast the sign of the input gradient, which is
  all FGSM and PGD use, differs from fp32 on 1.6-2.8 % of the pixels of the smoke models (measured
  on 8x8 digits), above the 0.1 % that issue 13 allows; so :func:`fp32` switches autocast off
  inside every input-gradient computation, and FGSM examples agree with fp32 on every pixel
  (``tests/test_accel.py`` measures the share). Only the forward passes that classify run in bf16.

The kind of device and numerics (:func:`compute_kind`, e.g. ``"cpu/fp32"`` or
``"cuda:NVIDIA H200/bf16/channels_last"``) is part of every artifact key, so results computed
on a CPU and on a GPU never share a cache entry.

Used by chapters 00-05 (through ``experiments`` and ``datasets.load``) and by ``python -m rclib``.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rclib.core.config import Config, resolve_device

EFFECTIVE_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    """How a loop moves and computes its batches. The default is plain fp32, NCHW, blocking
    copies: today's CPU behaviour, bit for bit."""

    precision: str = "fp32"  # fp32 | bf16: autocast dtype of forward passes (never of attack gradients)
    channels_last: bool = False  # copy inputs as NHWC (the model is converted by prepare)
    non_blocking: bool = False  # asynchronous host-to-GPU copies, when the loader pins memory

    def __post_init__(self) -> None:
        if self.precision not in EFFECTIVE_PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not allowed: one of "
                             f"{', '.join(EFFECTIVE_PRECISIONS)} (resolve 'auto' with effective_precision)")


PLAIN = Runtime()


def effective_precision(precision: str, device_type: str) -> str:
    """``"auto"`` is bf16 on CUDA and fp32 elsewhere; ``"fp32"`` and ``"bf16"`` are themselves."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in EFFECTIVE_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: one of auto, {', '.join(EFFECTIVE_PRECISIONS)}")
    return precision


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def runtime(cfg: Config, device: str | torch.device | None = None) -> Runtime:
    """The :class:`Runtime` of ``cfg`` on ``device`` (default ``config.resolve_device(cfg.device)``):
    channels_last and asynchronous copies only on CUDA, precision by :func:`effective_precision`.

    Used by chapters 00-05 through ``experiments``."""
    kind = _device_type(device if device is not None else resolve_device(cfg.device))
    cuda = kind == "cuda"
    return Runtime(precision=effective_precision(cfg.precision, kind),
                   channels_last=cfg.channels_last and cuda, non_blocking=cfg.non_blocking and cuda)


def device_kind(device: str | torch.device) -> str:
    """``"cpu"``, or ``"cuda:<GPU name>"``: what produced a result, for artifact keys."""
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(d)}"
    return d.type


def compute_kind(cfg: Config, device: str | torch.device | None = None) -> str:
    """Device kind, effective precision and (on CUDA) layout, joined by ``/``: the part of an
    artifact key that says where and how a result was computed. Used by ``artifacts.location``."""
    device = device if device is not None else resolve_device(cfg.device)
    rt = runtime(cfg, device)
    parts = [device_kind(device), rt.precision] + (["channels_last"] if rt.channels_last else [])
    return "/".join(parts)


def configure(cfg: Config, device: str | torch.device) -> None:
    """Process-wide torch settings for ``device``: on CUDA, ``cudnn.benchmark`` from the config
    (cuDNN times its convolution algorithms once per input shape and keeps the fastest); on CPU,
    ``cfg.threads`` intra-op threads. Used by ``config.configure_torch``."""
    if _device_type(device) == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    else:
        torch.set_num_threads(cfg.threads)


def prepare(model: nn.Module, rt: Runtime | None) -> nn.Module:
    """``model`` converted in place to the runtime's memory layout (channels_last for NHWC);
    returns it. Parameters keep their names, shapes and values."""
    if rt is not None and rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, rt: Runtime | None = None,
              pinned: bool = False) -> torch.Tensor:
    """``x`` on ``device``: asynchronously when ``rt.non_blocking`` and ``pinned`` (a page-locked
    source), as NHWC when ``rt.channels_last`` and ``x`` is a 4-d image batch."""
    rt = rt or PLAIN
    non_blocking = rt.non_blocking and pinned and torch.device(device).type == "cuda"
    if rt.channels_last and x.dim() == 4:
        return x.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    return x.to(device, non_blocking=non_blocking)


def batch_to(x: torch.Tensor, y: torch.Tensor, device: torch.device, rt: Runtime | None = None,
             loader: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's ``(x, y)`` on ``device``; asynchronous only if ``loader`` pins its batches."""
    pinned = bool(getattr(loader, "pin_memory", False))
    return to_device(x, device, rt, pinned), to_device(y, device, rt, pinned)


def autocast(device: torch.device, rt: Runtime | None = None) -> ContextManager:
    """bf16 autocast on ``device``'s type when ``rt.precision`` is bf16; otherwise a context that
    does nothing at all (not even a disabled autocast), so fp32 runs are untouched."""
    if rt is None or rt.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def fp32(device: torch.device) -> ContextManager:
    """Autocast switched off on ``device``'s type: input gradients for attacks are taken in fp32
    even inside a bf16 loop (see the module docstring for the measured reason)."""
    kind = torch.device(device).type
    if not torch.is_autocast_enabled(kind):  # nothing to switch off: leave fp32 code untouched
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def configure_torch(cfg: Config) -> str:
    """Seed everything, apply the device's process-wide settings, and return the device to use.

    On CPU the intra-op thread count is ``cfg.threads``; on CUDA ``threads`` is ignored (torch
    keeps its default, so the host side of data loading is not throttled) and
    ``cudnn.benchmark`` follows ``cfg.cudnn_benchmark`` (:func:`rclib.core.accel.configure`).

    ``OMP_WAIT_POLICY=PASSIVE`` must be set before torch starts its thread pool; the runner and
    the tests set it, and this sets it for notebooks started some other way (see DESIGN pitfalls).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    device = resolve_device(cfg.device)
    configure(cfg, device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model`` itself. Used by
    ``robust.adversarial_margin_loss`` (Alg 7's input gradients) and this module."""
    return model.module if isinstance(model, DistributedDataParallel) else model
