"""Chapter 01's experiments: every pruning algorithm (Alg 1-5) at every rate, Alg 5's cached
trajectory, hardening's speed and BatchNorm recalibration.

Used by chapter 01 (and the trajectory by chapter 03 and ``python -m rclib retrain --step alg5``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from rclib.compress import harden, iterative, prune, sizes
from rclib.core import accel, artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.experiments.steps import kind_of, retrainer, runtime_of
from rclib.nn import masks, models, timing, train
from rclib.robust import attacks


@dataclasses.dataclass(frozen=True)
class Pruning:
    """One compressed variant of chapter 01: a pruning algorithm (``prune.METHODS``, or
    ``"iterative"`` for Alg 5) and whether the masked copy is then hardened (Alg 4). ``label`` is
    its name in tables and figures; code decides by the fields."""

    method: str
    hardened: bool = False

    @property
    def label(self) -> str:
        return f"{self.method} (hardened)" if self.hardened else self.method

    def __str__(self) -> str:
        return self.label


GLOBAL, LAYER, CHANNEL = (Pruning(m) for m in prune.METHODS)
CHANNEL_HARDENED = Pruning("channel", hardened=True)
ITERATIVE_HARDENED = Pruning("iterative", hardened=True)
ONE_SHOT = (GLOBAL, LAYER, CHANNEL, CHANNEL_HARDENED)  # Figure 1's one-shot variants (not retrained)
ALGORITHMS = prune.METHODS + ("iterative",)  # Alg 1, 2, 3 and 5: chapter 03's compressed variants

SWEEP = Step("prune_sweep", ("seed", "data", "model", "train", "retrain", "prune_rates", "prune_step", "epsilon"))
TRAJECTORY = Step("trajectory", ("seed", "data", "model", "train", "retrain", "prune_rates", "prune_step"))


def pruned(model: nn.Module, how: Pruning, rate: float) -> nn.Module:
    """A copy of ``model`` pruned one-shot by ``how`` at ``rate`` (hardened when ``how`` says
    so); ``model`` is untouched. Used by chapters 01 and 03-04."""
    if how.method not in prune.METHODS:
        raise ValueError(f"{how.method!r} is not a one-shot method ({', '.join(prune.METHODS)}); "
                         "Alg 5 runs through iterative_trajectory")
    copy_ = masks.clone(model)
    prune.prune(copy_, how.method, rate)
    return harden.harden(copy_) if how.hardened else copy_


@dataclasses.dataclass(frozen=True)
class HostModel:
    """A model kept on the host as its architecture (``models.describe``) and its effective
    state (masks folded in, plain tensors, one copy): many variants then cost host memory
    instead of device memory, and each becomes a model again only while it is used.

    Used by :func:`iterative_trajectory` (chapters 01 and 03).
    """

    spec: dict[str, Any]
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: models.VGG) -> "HostModel":
        return cls(models.describe(model), masks.effective_state(model))

    def build(self, device: Any = "cpu") -> models.VGG:
        """A fresh model holding this state, in eval mode, on ``device``."""
        return models.from_state(self.spec, self.state, device)


def trajectory_artifact(cfg: Config, base: nn.Module, rates) -> dict[str, Any]:
    """The key of Alg 5's trajectory through ``rates`` from ``base`` (``artifacts.cached(**key,
    ...)`` and ``artifacts.location(**key)`` take it): one definition for the chapters and for
    ``python -m rclib retrain --step alg5`` (one process or many)."""
    stops = tuple(sorted(float(r) for r in rates))
    return dict(cfg=dataclasses.replace(cfg, prune_rates=stops), step=TRAJECTORY, kind=kind_of(cfg, base))


def trajectory_run(cfg: Config, base: nn.Module, rates, retrain: Callable[[nn.Module], object]) -> dict[float, HostModel]:
    """Alg 5 on a copy of ``base`` (channel pruning in ``cfg.prune_step`` steps, ``retrain``
    after each), stopping at every rate of ``rates``; not cached (see :func:`iterative_trajectory`).
    ``retrain`` is :func:`retrainer`'s, or a distributed one (``rclib.experiments.distributed``)."""
    rates = sorted(float(r) for r in rates)
    out: dict[float, HostModel] = {}

    def keep(model: nn.Module, r: float) -> None:
        if any(abs(r - q) < 1e-9 for q in rates):
            out[r] = HostModel.of(harden.harden(model))

    iterative.iterative(masks.clone(base), rates[-1], cfg.prune_step, retrain, "channel", on_step=keep, extra=rates)
    return out


def trajectory_tensors(found: dict[float, HostModel]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trajectory as an artifact's tensors (``"<rate>/<name>"``) and metrics (each rate's spec)."""
    tensors = {f"{r!r}/{k}": v for r, host in found.items() for k, v in host.state.items()}
    return tensors, {"specs": {repr(r): host.spec for r, host in found.items()}}


def trajectory_check(rates) -> Callable[[dict | None, dict], None]:
    """The ``check`` of a trajectory artifact: one spec and one state for every rate."""
    want = {repr(float(r)) for r in rates}

    def check(tensors, metrics):
        if tensors is None or set(metrics.get("specs", {})) != want:
            raise KeyError(f"the trajectory lacks rates: has {sorted(metrics.get('specs', {}))}")
        if {k.split("/", 1)[0] for k in tensors} != want:
            raise KeyError("the trajectory's tensors do not match its rates")
    return check


def iterative_trajectory(cfg: Config, splits: datasets.Splits, base: nn.Module, rates) -> dict[float, HostModel]:
    """Alg 5 on a copy of ``base`` (channel pruning in ``cfg.prune_step`` steps, ``retrainer``
    after each), stopping at every rate of ``rates`` on one trajectory to the largest (cached, so
    ``python -m rclib retrain --step alg5``, e.g. under torchrun, can compute it elsewhere).

    Returns:
        ``{rate: HostModel of the hardened model at that rate}`` in increasing rate order: the
        hardened copies go to the host as they are made, so the device holds ``base``, the
        model being pruned and one hardened copy at a time, however many rates there are.

    Used by :func:`prune_sweep` (chapter 01) and :func:`compressed_variants` (chapter 03).
    """
    rates = sorted(float(r) for r in rates)
    tensors, metrics, _ = artifacts.cached(
        **trajectory_artifact(cfg, base, rates), check=trajectory_check(rates),
        compute=lambda: trajectory_tensors(trajectory_run(cfg, base, rates, retrainer(cfg, splits))))
    return {r: HostModel(metrics["specs"][repr(r)], {k.split("/", 1)[1]: v for k, v in tensors.items()
                                                      if k.split("/", 1)[0] == repr(r)}) for r in rates}


OUTPUT_RTOL = 1e-5  # on a GPU: agreement relative to the largest logit


@torch.no_grad()
def outputs_agree(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[bool, float]:
    """Whether ``a`` and ``b`` compute the same logits on ``x``, in eval mode (modes restored).

    On a CPU the same weights and inputs give the same bits, so agreement means equality. On a
    GPU two models with equal weights may still differ in the last bits: cuDNN picks its
    convolution algorithm per call, some are non-deterministic, and TF32 rounding goes with the
    algorithm; there agreement means within ``OUTPUT_RTOL`` of the largest logit. ``x`` goes to
    ``a``'s device (``b`` must be on the same one) in batches of ``batch_size``.

    Returns:
        ``(agree, largest absolute difference)``.

    Used by chapter 02 (a compressed file loads back to the same function).
    """
    device = next(a.parameters()).device
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        diff, scale = 0.0, 0.0
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            la, lb = a(xb).float(), b(xb).float()
            diff = max(diff, float((la - lb).abs().max()))
            scale = max(scale, float(la.abs().max()))
    finally:
        a.train(modes[0]), b.train(modes[1])
    return (diff == 0.0 if device.type == "cpu" else diff <= OUTPUT_RTOL * max(scale, 1.0)), diff


def measure(model: nn.Module, splits: datasets.Splits, eps: float,
            runtime: accel.Runtime | None = None) -> dict[str, Any]:
    """Clean and FGSM robust test accuracy (computed with ``runtime``), and the model's size by
    every yardstick we use."""
    return dict(accuracy=train.evaluate(model, splits.test, runtime=runtime),
                robust_accuracy=attacks.robust_accuracy(model, splits.test, attacks.fgsm, eps, runtime=runtime),
                nonzero=sizes.nonzero_parameters(model),
                parameters=sum(t.numel() for t in masks.effective_state(model).values()),
                approx_mb=sizes.approx_size_mb(model),
                dense_bytes=sizes.dense_bytes(model))


def prune_sweep(cfg: Config, splits: datasets.Splits, base: nn.Module,
                progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Figure 1/3 data: every pruning method at every rate of ``cfg.prune_rates`` (cached).

    Methods: ``global`` (Alg 1), ``layer`` (Alg 2), ``channel`` (Alg 3, masked),
    ``channel (hardened)`` (Alg 3 + Alg 4) and ``iterative (hardened)`` (Alg 5: channel pruning
    in steps of ``cfg.prune_step`` with ``retrainer`` in between, measured after hardening at
    each rate of the sweep on one trajectory). One-shot methods are not retrained, as in the
    paper's Figure 1.

    Returns:
        ``(rows, cached)``; each row is ``{"method", "rate"}`` plus :func:`measure`'s fields.

    Used by chapter 01.
    """
    rates = sorted(cfg.prune_rates)
    rt = runtime_of(cfg, base)

    def compute():
        rows = []
        bar = progress_bar(total=len(ONE_SHOT) * len(rates) + 1, show=progress, desc="prune sweep")
        for how in ONE_SHOT:
            for r in rates:
                rows.append(dict(method=how.label, rate=r, **measure(pruned(base, how, r), splits, cfg.epsilon, rt)))
                bar.update()

        device = next(base.parameters()).device
        for r, host in iterative_trajectory(cfg, splits, base, rates).items():
            hardened = host.build(device)
            rows.append(dict(method=ITERATIVE_HARDENED.label, rate=r, **measure(hardened, splits, cfg.epsilon, rt)))
            del hardened
        bar.update()
        bar.close()
        return None, {"rows": rows}

    check = artifacts.rows_with("method", "rate", "accuracy", "robust_accuracy", "nonzero", "parameters",
                                "approx_mb", "dense_bytes")
    _, metrics, hit = artifacts.cached(cfg, SWEEP, compute, check=check, kind=kind_of(cfg, base))
    return metrics["rows"], hit


def recalibration_rows(cfg: Config, splits: datasets.Splits, base: nn.Module) -> list[dict[str, Any]]:
    """One-shot channel pruning at every rate of ``cfg.prune_rates``, clean test accuracy before
    and after re-estimating BatchNorm statistics (``train.recalibrate_batchnorm``, seeded with
    ``cfg.seed``), no weight changed. Cheap, so not cached. Used by chapter 01."""
    rows = []
    rt = runtime_of(cfg, base)
    for r in sorted(cfg.prune_rates):
        m = pruned(base, CHANNEL, r)
        before = train.evaluate(m, splits.test, runtime=rt)
        train.recalibrate_batchnorm(m, splits.train, seed=cfg.seed, runtime=rt)
        rows.append(dict(rate=r, one_shot=before, recalibrated=train.evaluate(m, splits.test, runtime=rt)))
    return rows


def hardening_speed(cfg: Config, splits: datasets.Splits, base: nn.Module) -> list[dict[str, Any]]:
    """Figure 4 data: median forward latency of the unpruned model, the channel-pruned masked
    model (``cfg.prune_rate``) and its hardened copy at batch 1 and ``cfg.latency_batch``, over
    ``cfg.latency_repeats`` timed passes each (``timing.latency``). The variants are made and
    timed one after the other, so the device holds ``base`` and one variant (the masked one
    while it is hardened). Wall-clock on this machine: never cached. Used by chapter 01."""
    batches = sorted({1, cfg.latency_batch})

    def times(name: str, m: nn.Module) -> list[dict[str, Any]]:
        return [dict(model=name, batch=b, seconds=timing.latency(m, splits.input_shape, batch=b,
                                                                 repeats=cfg.latency_repeats)) for b in batches]

    rows = times("unpruned", base)
    masked = pruned(base, CHANNEL, cfg.prune_rate)
    rows += times(f"masked (r={cfg.prune_rate:g})", masked)
    hardened = harden.harden(masked)
    del masked
    return rows + times("hardened", hardened)
