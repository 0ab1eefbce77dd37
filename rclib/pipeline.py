"""Cached steps shared by the chapters: each trains or loads what it needs, so any chapter runs
on its own (papermill) and recomputes only what is missing or stale.

Every loop runs with ``accel.runtime(cfg, device)`` (:func:`runtime_of`): plain fp32 on a CPU,
bf16 autocast, channels_last and asynchronous copies on CUDA, as the config says.

Used by chapter 00 (``baseline``) and every later chapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import accel, artifacts, attacks, codec, config, data, models, operating, prune, sizes, train, verify
from .config import Config
from .retrain import ABLATION_ROWS, TABLE1_ROWS  # noqa: F401  (chapters read them here)

DATA_FIELDS = ("seed", "dataset", "data_dir", "image_size", "train_size", "test_size", "test_fraction")
MODEL_FIELDS = ("model", "width", "hidden", "batch_norm", "dropout", "weights", "head_epochs")
TRAIN_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs")
BASELINE_FIELDS = DATA_FIELDS + MODEL_FIELDS + TRAIN_FIELDS


def runtime_of(cfg: Config, model: nn.Module) -> accel.Runtime:
    """The :class:`rclib.accel.Runtime` of ``cfg`` on the device ``model`` lives on."""
    return accel.runtime(cfg, train.model_device(model))


def kind_of(cfg: Config, model: nn.Module) -> str:
    """The artifact key's compute kind for work done on ``model``'s device (which may differ
    from ``cfg.device`` when a caller passes another device)."""
    return accel.compute_kind(cfg, train.model_device(model))


HOST_KIND = "cpu/fp32"  # steps that never leave the CPU, whatever the device: keyed as such


def new_model(cfg: Config, splits: data.Splits, pretrained: bool = True) -> models.VGG:
    """An untrained (or torchvision-pretrained) model shaped for ``splits``; ``pretrained=False``
    when a full state dict is loaded into it right away (``models.build``)."""
    return models.build(cfg, splits.num_classes, splits.input_shape, splits.mean, splits.std, pretrained=pretrained)


def fit_head(cfg: Config, model: nn.Module, splits: data.Splits, progress: bool = True,
             runtime: accel.Runtime | None = None) -> list[dict[str, Any]]:
    """Fit ``model``'s classifier head alone (every other parameter frozen) for
    ``cfg.head_epochs`` epochs with the baseline's optimiser: the step that makes pretrained
    weights with another class count usable when ``cfg.epochs`` is 0 (the paper profile), and a
    gentler start otherwise (a random head's gradients would first wreck the pretrained trunk).
    BatchNorm running statistics, which are buffers and not parameters, still adapt to the data
    in training mode. Returns the per-epoch history. Used by :func:`baseline` (chapter 00)."""
    head = dict(model.named_modules())[models.head_name(model)]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    try:
        return train.fit(model, splits.train, cfg.head_epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                         desc="new head", progress=progress, blame=f"lr={cfg.lr:g} (optimizer {cfg.optimizer})",
                         runtime=runtime)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def baseline(cfg: Config, splits: data.Splits, device: str = "cpu",
             progress: bool = True) -> tuple[nn.Module, dict[str, Any], bool]:
    """Train the unpruned baseline h (or load it from the artifact cache).

    When ``cfg.weights`` brings a classifier head of another shape (``models.head_is_new``),
    :func:`fit_head` first fits a new head alone for ``cfg.head_epochs`` epochs; then all
    parameters train for ``cfg.epochs`` epochs.

    Args:
        cfg: uses the data, model and training fields (``BASELINE_FIELDS``, the cache key).
        splits: from ``data.load(cfg)``.
        device: where the returned model lives.

    Returns:
        ``(model, metrics, cached)``: the model in eval mode; metrics with ``clean_accuracy``
        (test set, in [0, 1]), ``history`` (per-epoch loss and training accuracy of the full
        training) and ``head_history`` (of the head-only epochs; empty when no new head was needed);
        ``cached`` tells whether it came from disk.

    Used by chapter 00 and, as the starting point, by chapters 01-04.
    """
    rt = accel.runtime(cfg, device)

    def compute():
        model = accel.prepare(new_model(cfg, splits).to(device), rt)
        head_history = fit_head(cfg, model, splits, progress, rt) if models.head_is_new(cfg, model) else []
        history = train.fit(model, splits.train, cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                            desc="baseline", progress=progress, blame=f"lr={cfg.lr:g} (optimizer {cfg.optimizer})",
                            runtime=rt)
        return model.state_dict(), {"clean_accuracy": train.evaluate(model, splits.test, runtime=rt),
                                    "history": history, "head_history": head_history}

    built: dict[str, nn.Module] = {}

    def check(tensors, metrics):  # a cached state must fit this model exactly, or be recomputed
        if not {"clean_accuracy", "history"} <= metrics.keys():
            raise KeyError(f"metrics lack clean_accuracy or history: {sorted(metrics)}")
        built["model"] = new_model(cfg, splits, pretrained=False)
        verify.check_state(tensors, built["model"].state_dict(), "the baseline model")  # dtypes too
        built["model"].load_state_dict(tensors, strict=True)

    tensors, metrics, hit = artifacts.cached(cfg, "baseline", BASELINE_FIELDS, compute, check=check,
                                             kind=accel.compute_kind(cfg, device))
    if not hit:
        check(tensors, metrics)
    return accel.prepare(built["model"].to(device), rt).eval(), metrics, hit


def over_seeds(cfg: Config, step: Callable[[Config, data.Splits, nn.Module], list[dict[str, Any]]],
               device: str = "cpu", progress: bool = True, park: Sequence[nn.Module] = ()) -> list[dict[str, Any]]:
    """Run ``step(cfg_s, splits_s, base_s)`` once per seed of ``cfg.seeds``, each on that seed's
    own data split and cached baseline (shared by every chapter), and return all rows, each
    tagged with its ``seed``. This is how every headline number becomes a mean with spread.

    ``park``: models the caller keeps for later cells (its own seed's baseline, a shared copy).
    They wait on the host during the loop and return to their device afterwards, so that on a
    GPU each seed's baseline and variants have the device to themselves (at paper scale a VGG16
    is 0.55 GB, with masks 1.1 GB). On CPU moving them changes nothing.

    Used by chapters 01-04.
    """
    away = [(m, d) for m in park if (d := train.model_device(m)).type != "cpu"]
    for m, _ in away:
        prune.move(m, "cpu")
    try:
        rows: list[dict[str, Any]] = []
        for s in tqdm(cfg.seeds, desc="seeds", disable=not progress):
            cfg_s = dataclasses.replace(cfg, seed=s)
            splits_s = data.load(cfg_s, device)
            base_s, _, _ = baseline(cfg_s, splits_s, device, progress=False)
            rows += [dict(r, seed=s) for r in step(cfg_s, splits_s, base_s)]
            del base_s
        return rows
    finally:
        for m, home in away:
            prune.move(m, home)


# The operating point depends on every seed's baseline, not on the chapter's own ``seed``
OPERATING_FIELDS = tuple(f for f in BASELINE_FIELDS if f != "seed") + ("seeds", "epsilon")


def operating_point(cfg: Config, device: str = "cpu") -> operating.OperatingPoint:
    """The epsilon of every robust number set beside the paper's (:mod:`rclib.operating`), cached.

    With ``epsilon: match`` it runs :func:`rclib.operating.match_epsilon` on the FGSM robust
    accuracy of the baselines of ``cfg.seeds`` (trained or loaded, one at a time, over their own
    test sets) and caches the result, keyed by the baselines' settings and the seeds. With a
    number it returns that number, measuring nothing. Either way ``point.apply(cfg)`` is the config
    the chapter continues with.

    Raises:
        ValueError: from :func:`rclib.operating.match_epsilon` when no epsilon matches (nothing is
            cached then), saying what was measured.

    Used by every chapter right after its configuration cell, and by ``python -m rclib``.
    """
    if cfg.epsilon != "match":
        return operating.fixed(cfg)

    def curve(grid):
        rows = over_seeds(cfg, lambda c, s, b: [dict(acc=attacks.fgsm_curve(b, s.test, grid, runtime=runtime_of(c, b)))],
                          device, progress=False)
        return [r["acc"] for r in rows]  # one row per seed, one column per epsilon

    def compute():
        eps, per_seed, grid = operating.match_epsilon(curve)
        return None, {"epsilon": eps, "per_seed": [float(v) for v in per_seed], "seeds": list(cfg.seeds),
                      "grid": grid, "target": operating.TARGET, "tolerance": operating.TOLERANCE}

    def check(tensors, metrics):
        if not {"epsilon", "per_seed", "seeds", "grid"} <= metrics.keys() or list(metrics["seeds"]) != list(cfg.seeds):
            raise KeyError("the operating point lacks its epsilon, its per-seed accuracies or its seeds")

    _, m, _ = artifacts.cached(cfg, "operating_point", OPERATING_FIELDS, compute, check=check,
                               kind=accel.compute_kind(cfg, device))
    return operating.OperatingPoint(epsilon=float(m["epsilon"]), matched=True, seeds=tuple(m["seeds"]),
                                    per_seed=tuple(m["per_seed"]), target=float(m["target"]),
                                    tolerance=float(m["tolerance"]), grid=tuple(map(tuple, m["grid"])))


RETRAIN_FIELDS = ("retrain_epochs", "retrain_optimizer", "retrain_lr", "retrain_momentum",
                  "retrain_weight_decay")
SWEEP_FIELDS = BASELINE_FIELDS + RETRAIN_FIELDS + ("prune_rates", "prune_step", "epsilon")


def retrainer(cfg: Config, splits: data.Splits, desc: str = "retrain",
              loader: DataLoader | None = None) -> Callable[[nn.Module], object]:
    """``retrain(model)``: ``cfg.retrain_epochs`` of mask-keeping training with the retraining
    optimiser (App. C: SGD, lr 0.005, momentum 0.9, weight decay 0.005) on ``loader`` (default
    ``splits.train``; ``rclib.distributed`` passes a rank's shard). Alg 5's retrain()."""
    def retrain(model: nn.Module):
        return train.fit(model, splits.train if loader is None else loader, cfg.retrain_epochs, lr=cfg.retrain_lr,
                         optimizer=cfg.retrain_optimizer, momentum=cfg.retrain_momentum,
                         weight_decay=cfg.retrain_weight_decay, seed=cfg.seed, desc=desc,
                         progress=False, blame=f"retrain_lr={cfg.retrain_lr:g}", runtime=runtime_of(cfg, model))
    return retrain


def pruned(model: nn.Module, method: str, rate: float) -> nn.Module:
    """A pruned copy of ``model`` (one-shot ``method`` at ``rate``); ``model`` is untouched.
    ``method`` may end in ``" (hardened)"`` for a channel-pruned then hardened copy."""
    hardened = method.endswith(" (hardened)")
    base = method.removesuffix(" (hardened)")
    copy_ = prune.clone(model)
    prune.prune(copy_, base, rate)
    return prune.harden(copy_) if hardened else copy_


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
        return cls(models.describe(model), sizes.effective_state(model))

    def build(self, device: Any = "cpu") -> models.VGG:
        """A fresh model holding this state, in eval mode, on ``device``."""
        return models.from_state(self.spec, self.state, device)


TRAJECTORY_FIELDS = BASELINE_FIELDS + RETRAIN_FIELDS + ("prune_step", "prune_rates")


def trajectory_artifact(cfg: Config, base: nn.Module, rates) -> dict[str, Any]:
    """The key of Alg 5's trajectory through ``rates`` from ``base`` (``artifacts.cached(**key,
    ...)`` and ``artifacts.location(**key)`` take it): one definition for the chapters and for
    ``python -m rclib retrain --step alg5`` (one process or many)."""
    stops = tuple(sorted(float(r) for r in rates))
    return dict(cfg=dataclasses.replace(cfg, prune_rates=stops), step="trajectory", names=TRAJECTORY_FIELDS,
                kind=kind_of(cfg, base))


def trajectory_run(cfg: Config, base: nn.Module, rates, retrain: Callable[[nn.Module], object]) -> dict[float, HostModel]:
    """Alg 5 on a copy of ``base`` (channel pruning in ``cfg.prune_step`` steps, ``retrain``
    after each), stopping at every rate of ``rates``; not cached (see :func:`iterative_trajectory`).
    ``retrain`` is :func:`retrainer`'s, or a distributed one (``rclib.distributed``)."""
    rates = sorted(float(r) for r in rates)
    out: dict[float, HostModel] = {}

    def keep(model: nn.Module, r: float) -> None:
        if any(abs(r - q) < 1e-9 for q in rates):
            out[r] = HostModel.of(prune.harden(model))

    prune.iterative(prune.clone(base), rates[-1], cfg.prune_step, retrain, "channel", on_step=keep, extra=rates)
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


def iterative_trajectory(cfg: Config, splits: data.Splits, base: nn.Module, rates) -> dict[float, HostModel]:
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


def measure(model: nn.Module, splits: data.Splits, eps: float,
            runtime: accel.Runtime | None = None) -> dict[str, Any]:
    """Clean and FGSM robust test accuracy (computed with ``runtime``), and the model's size by
    every yardstick we use."""
    return dict(accuracy=train.evaluate(model, splits.test, runtime=runtime),
                robust_accuracy=attacks.robust_accuracy(model, splits.test, attacks.fgsm, eps, runtime=runtime),
                nonzero=sizes.nonzero_parameters(model),
                parameters=sum(t.numel() for t in sizes.effective_state(model).values()),
                approx_mb=sizes.approx_size_mb(model),
                dense_bytes=sizes.dense_bytes(model))


def prune_sweep(cfg: Config, splits: data.Splits, base: nn.Module,
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
        one_shot = ("global", "layer", "channel", "channel (hardened)")
        bar = tqdm(total=len(one_shot) * len(rates) + 1, desc="prune sweep", disable=not progress)
        for method in one_shot:
            for r in rates:
                rows.append(dict(method=method, rate=r, **measure(pruned(base, method, r), splits, cfg.epsilon, rt)))
                bar.update()

        device = next(base.parameters()).device
        for r, host in iterative_trajectory(cfg, splits, base, rates).items():
            hardened = host.build(device)
            rows.append(dict(method="iterative (hardened)", rate=r, **measure(hardened, splits, cfg.epsilon, rt)))
            del hardened
        bar.update()
        bar.close()
        return None, {"rows": rows}

    check = artifacts.rows_with("method", "rate", "accuracy", "robust_accuracy", "nonzero", "parameters",
                                "approx_mb", "dense_bytes")
    _, metrics, hit = artifacts.cached(cfg, "prune_sweep", SWEEP_FIELDS, compute, check=check, kind=kind_of(cfg, base))
    return metrics["rows"], hit


def recalibration_rows(cfg: Config, splits: data.Splits, base: nn.Module) -> list[dict[str, Any]]:
    """One-shot channel pruning at every rate of ``cfg.prune_rates``, clean test accuracy before
    and after re-estimating BatchNorm statistics (``train.recalibrate_batchnorm``, seeded with
    ``cfg.seed``), no weight changed. Cheap, so not cached. Used by chapter 01."""
    rows = []
    rt = runtime_of(cfg, base)
    for r in sorted(cfg.prune_rates):
        m = pruned(base, "channel", r)
        before = train.evaluate(m, splits.test, runtime=rt)
        train.recalibrate_batchnorm(m, splits.train, seed=cfg.seed, runtime=rt)
        rows.append(dict(rate=r, one_shot=before, recalibrated=train.evaluate(m, splits.test, runtime=rt)))
    return rows


def hardening_speed(cfg: Config, splits: data.Splits, base: nn.Module) -> list[dict[str, Any]]:
    """Figure 4 data: median forward latency of the unpruned model, the channel-pruned masked
    model (``cfg.prune_rate``) and its hardened copy at batch 1 and ``cfg.latency_batch``, over
    ``cfg.latency_repeats`` timed passes each (``timing.latency``). The variants are made and
    timed one after the other, so the device holds ``base`` and one variant (the masked one
    while it is hardened). Wall-clock on this machine: never cached. Used by chapter 01."""
    from . import timing

    batches = sorted({1, cfg.latency_batch})

    def times(name: str, m: nn.Module) -> list[dict[str, Any]]:
        return [dict(model=name, batch=b, seconds=timing.latency(m, splits.input_shape, batch=b,
                                                                 repeats=cfg.latency_repeats)) for b in batches]

    rows = times("unpruned", base)
    masked = pruned(base, "channel", cfg.prune_rate)
    rows += times(f"masked (r={cfg.prune_rate:g})", masked)
    hardened = prune.harden(masked)
    del masked
    return rows + times("hardened", hardened)


ROBUST_FIELDS = BASELINE_FIELDS + RETRAIN_FIELDS + (
    "epsilon", "epsilons", "adv_epsilon", "margin_weight", "margin_on", "adv_epochs", "conv_bits", "linear_bits")



def share_bits(cfg: Config) -> dict[str, int]:
    """Table 2's index widths as ``share.weight_share`` takes them."""
    return {"conv": cfg.conv_bits, "linear": cfg.linear_bits}


def robust_table(cfg: Config, splits: data.Splits, base: nn.Module, rate: float,
                 progress: bool = True) -> tuple[list[dict[str, Any]], Mapping[str, dict], bool]:
    """Table 1 for one seed (``cfg.seed``) and one global prune rate, plus Alg 7's ablation.

    Rows (each a copy of ``base`` pruned with global unstructured pruning at ``rate``):

    * ``Baseline``: unpruned.
    * ``Pruned``: no retraining.
    * ``Pruned + Retrained``: the same budget as Alg 7 (``cfg.adv_epochs`` epochs, the same
      optimiser) on clean data only, plain cross-entropy.
    * ``Pruned + Adv Ret.``: Alg 7, ``robust.adversarial_retrain`` with ``cfg.adv_epsilon`` and
      ``cfg.margin_weight``.
    * ``Pruned + Adv Ret. + WS``: then weight sharing (Alg 6, ``cfg.conv_bits``/``linear_bits``).
    * Ablation: Alg 7 with ``margin_weight = 0`` (FGSM training only) and with ``eps = 0``
      (clean data + margin only).

    Each row has clean and FGSM (``cfg.epsilon``) test accuracy, FGSM robust accuracy among the
    test inputs the model classifies correctly (``robust_given_clean``: robustness apart from
    clean accuracy), the FGSM curve over ``cfg.epsilons`` (``curve``), the paper's approximate size
    (weight-shared formula for the WS row) and the bytes of our compressed file. The retrained
    models are :func:`rclib.retrain.retrained`'s cached steps and their accuracies
    :func:`rclib.retrain.evaluated`'s (the same counts ``train.evaluate`` and ``robust_accuracy``
    give, or those ``python -m rclib evaluate`` wrote under torchrun); they are loaded one at a
    time with their masks folded in, so at most two models (``base`` and one variant) exist at once.

    Returns:
        ``(rows, states, cached)``; ``states`` maps every variant's name to its effective state
        dict (masks folded in; load with ``strict=True`` into ``new_model``), built or read from
        the cache on each access and not kept (``retrain.LazyStates``): Figure 8's decision maps
        and chapter 05's attacks use them.

    Used by chapters 04 and 05.
    """
    from . import retrain, share

    device = next(base.parameters()).device
    names = TABLE1_ROWS + ABLATION_ROWS

    def state_of(name: str) -> dict[str, torch.Tensor]:
        if name == "Baseline":
            return sizes.effective_state(base)
        if name == "Pruned":
            return sizes.effective_state(pruned(base, "global", rate))
        if name.endswith(" + WS"):
            m = model_of(name.removesuffix(" + WS"))
            share.weight_share(m, share_bits(cfg))
            return sizes.effective_state(m)
        return retrain.retrained(cfg, splits, base, rate, retrain.STEP_OF[name])[0]

    rt = runtime_of(cfg, base)

    def model_of(name: str) -> nn.Module:
        m = new_model(cfg, splits, pretrained=False)
        m.load_state_dict(state_of(name), strict=True)
        return accel.prepare(m.to(device), rt).eval()

    def compute():
        rows = []
        for name in tqdm(names, desc=f"Table 1 at r={rate:g}", disable=not progress):
            if name in retrain.STEP_OF:  # a retrained model's evaluation is its own cached step
                found, counts, _ = retrain.evaluated(cfg, splits, base, rate, retrain.STEP_OF[name])
                acc = {k: counts[k]["correct"] / max(counts[k]["n"], 1) for k in ("clean", "fgsm")}
                clean_ok, fgsm_ok = found["clean"].bool(), found["fgsm"].bool()
            m = base if name == "Baseline" else model_of(name)
            if name not in retrain.STEP_OF:
                clean_ok = attacks.robust_correct(m, splits.test, attacks.fgsm, 0.0, runtime=rt)
                fgsm_ok = attacks.robust_correct(m, splits.test, attacks.fgsm, cfg.epsilon, runtime=rt)
                acc = dict(clean=train.evaluate(m, splits.test, runtime=rt),
                           fgsm=int(fgsm_ok.sum()) / max(len(fgsm_ok), 1))
            rows.append(dict(
                variant=name, seed=cfg.seed, rate=rate, accuracy=acc["clean"], robust_accuracy=acc["fgsm"],
                robust_given_clean=int((clean_ok & fgsm_ok).sum()) / max(int(clean_ok.sum()), 1),
                curve=attacks.fgsm_curve(m, splits.test, cfg.epsilons, runtime=rt),
                approx_mb=share.shared_size_mb(m, share_bits(cfg)) if name.endswith(" + WS") else sizes.approx_size_mb(m),
                file_bytes=sizes.size_report(m)["file_bytes"]))
            del m
        return None, {"rows": rows}

    def check(tensors, metrics):  # every row chapter 04 tabulates
        artifacts.rows_with("variant", "seed", "rate", "accuracy", "robust_accuracy", "robust_given_clean", "curve",
                            "approx_mb", "file_bytes")(tensors, metrics)
        missing = set(names) - {row["variant"] for row in metrics["rows"]}
        if missing:
            raise KeyError(f"rows lack the variants {sorted(missing)}")

    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    _, metrics, hit = artifacts.cached(step_cfg, "robust_table", ROBUST_FIELDS + ("prune_rate",), compute,
                                       check=check, kind=kind_of(cfg, base))
    return metrics["rows"], retrain.LazyStates(names, state_of), hit


BOUNDARY_FIELDS = BASELINE_FIELDS + RETRAIN_FIELDS + (
    "prune_step", "map_rates", "epsilon", "conv_bits", "linear_bits", "resolution", "local_examples",
    "local_resolution")
BOUNDARY_METHODS = ("global", "layer", "channel", "iterative")
MAP_POINTS = config.MAP_POINTS


def map_inputs(splits: data.Splits, device: Any = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``MAP_POINTS`` test inputs and labels for PCA decision maps, spread across the classes
    (``data.spread_sample``, seeded): a 10k x 150k ImageNet matrix would not fit PCA in memory,
    and the first 1000 of a class-sorted test set would hold 100 of its 1000 classes. Every
    prefix covers as many classes as it can, so the local maps' ``x[:local_examples]`` do too.
    Digits' test set is used whole. Used by chapters 03 and 04."""
    x, y = data.spread_sample(splits.test, MAP_POINTS, seed)
    return x.to(device), y.to(device)


class CompressedVariants(Mapping):
    """Chapter 03's compressed versions of one baseline, by label, made one at a time.

    ``variants[label]`` is the variant's description ``{"method", "rate", "shared"}``;
    :meth:`model` builds the variant itself, afresh on each call, on ``base``'s device: nothing
    but the hardened models of the iterative trajectory (on the host, ``HostModel``) is kept,
    so a loop that drops each model before asking for the next holds ``base`` and one variant
    (a masked VGG16 alone is about 1.66 GB: weight_orig, mask and weight; 26 of them were 41 GB).
    Masks are folded into the weights (``prune.make_permanent``) once the variant is made, since
    nothing here retrains it: the same numbers from a third of the memory.

    Built by :func:`compressed_variants`. Used by chapter 03.
    """

    def __init__(self, cfg: Config, splits: data.Splits, base: nn.Module, rates,
                 methods=BOUNDARY_METHODS, shared=(False, True)):
        rates = sorted(float(r) for r in rates)
        self.base, self.bits = base, share_bits(cfg)
        # Alg 5 trains, so its models are made once, on one trajectory, and kept on the host
        self.hardened = iterative_trajectory(cfg, splits, base, rates) if "iterative" in methods else {}
        self._info: dict[str, dict[str, Any]] = {}
        for method, r in [("baseline", 0.0)] + [(m, r) for m in methods for r in rates]:
            for ws in shared:
                label = ("baseline" if method == "baseline" else f"{method} r={r:g}") + (" + WS" if ws else "")
                self._info[label] = dict(method=method, rate=r, shared=ws)

    def __getitem__(self, label: str) -> dict[str, Any]:
        return dict(self._info[label])

    def __iter__(self):
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def model(self, label: str) -> nn.Module:
        """The variant ``label`` in eval mode, masks folded; ``base`` itself for ``"baseline"``
        (never modified). Drop it (``del``) before asking for the next one."""
        from . import share

        v = self[label]
        if v["method"] == "baseline":
            if not v["shared"]:
                return self.base
            m = prune.clone(self.base)
        elif v["method"] == "iterative":
            m = self.hardened[v["rate"]].build(next(self.base.parameters()).device)
        else:
            m = pruned(self.base, v["method"], v["rate"])
        if v["shared"]:
            share.weight_share(m, self.bits)  # on the masked copy: pruned entries stay zero
        return prune.make_permanent(m).eval()


def compressed_variants(cfg: Config, splits: data.Splits, base: nn.Module, rates,
                        methods=BOUNDARY_METHODS, shared=(False, True)) -> CompressedVariants:
    """Every compressed version of ``base`` that chapter 03 compares, by label.

    ``methods``: one-shot ``global``/``layer``/``channel`` (Alg 1-3, not retrained) and
    ``iterative`` (Alg 5: channel pruning in ``cfg.prune_step`` steps with ``retrainer``,
    hardened), each at every rate of ``rates``, each without and with weight sharing (Alg 6 with
    ``share_bits(cfg)``). The baseline (``"baseline"``, and ``"baseline + WS"``) comes first.

    Returns:
        A :class:`CompressedVariants`: ``{label: {"method", "rate", "shared"}}`` in a stable
        order, whose ``model(label)`` builds each variant when it is needed.

    Example:
        >>> variants = compressed_variants(cfg, splits, base, [0.5])
        >>> for label in variants:
        ...     m = variants.model(label)
        ...     print(label, train.evaluate(m, splits.test))
        ...     del m  # one variant at a time

    Used by chapter 03.
    """
    return CompressedVariants(cfg, splits, base, rates, methods, shared)


def boundary_sweep(cfg: Config, splits: data.Splits, base: nn.Module,
                   progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Roughness against robustness for every variant of :func:`compressed_variants` at
    ``cfg.map_rates`` (cached).

    Each row: label, method, rate, shared, clean and FGSM (``cfg.epsilon``) accuracy, the
    ``boundary.roughness`` of the PCA map (``cfg.resolution``; one PCA plane fitted on the test
    inputs, shared by all variants) prefixed ``pca_``, and the mean roughness of local maps
    (``cfg.local_resolution``) around the first ``cfg.local_examples`` test inputs prefixed
    ``local_``. The PCA plane is fitted on :func:`map_inputs`. Variants are made, measured and
    dropped one at a time (``base`` and one variant on the device); map forward passes run in
    batches of ``cfg.eval_batch_size``.

    Used by chapter 03.
    """
    from . import boundary

    def compute():
        x, y = map_inputs(splits, next(base.parameters()).device, cfg.seed)
        n, batch = cfg.local_examples, cfg.eval_batch_size
        variants = compressed_variants(cfg, splits, base, cfg.map_rates)
        rows, pca = [], None
        for label in tqdm(variants, desc="roughness", disable=not progress):
            v, m = variants[label], variants.model(label)
            dmap = boundary.decision_map(m, x, y, resolution=cfg.resolution, pca=pca, batch_size=batch)
            pca = dmap.pca
            rt = runtime_of(cfg, m)
            row = dict(label=label, method=v["method"], rate=v["rate"], shared=v["shared"],
                       accuracy=train.evaluate(m, splits.test, runtime=rt),
                       robust_accuracy=attacks.robust_accuracy(m, splits.test, attacks.fgsm, cfg.epsilon,
                                                               runtime=rt))
            row.update({f"pca_{k}": float(val) for k, val in boundary.roughness(dmap).items()})
            row.update({f"local_{k}": float(val) for k, val in
                        boundary.local_roughness(m, x[:n], y[:n], seed=cfg.seed, resolution=cfg.local_resolution,
                                                 batch_size=batch).items()})
            rows.append(row)
            del m, dmap
        return None, {"rows": rows}

    check = artifacts.rows_with("label", "method", "rate", "shared", "accuracy", "robust_accuracy",
                                "pca_boundary_length", "pca_confidence_tv", "pca_regions",
                                "local_boundary_length", "local_confidence_tv")
    _, metrics, hit = artifacts.cached(cfg, "boundary_sweep", BOUNDARY_FIELDS, compute, check=check,
                                       kind=kind_of(cfg, base))
    return metrics["rows"], hit


SHARE_FIELDS = BASELINE_FIELDS + ("prune_rates", "epsilon", "conv_bits", "linear_bits")


def share_sweep(cfg: Config, splits: data.Splits, base: nn.Module,
                progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Figure 5 data: global pruning at every rate of ``cfg.prune_rates``, without and with
    weight sharing (Alg 6, ``share_bits(cfg)``), cached.

    Each row: rate, shared, clean and FGSM (``cfg.epsilon``) test accuracy, and the four sizes of
    ``sizes.size_report`` (bytes): dense safetensors, the paper's formula (with the
    weight-shared count for shared rows), our compressed file and its entropy bound.

    Used by chapter 02.
    """
    from . import share

    def compute():
        rows = []
        for r in tqdm(sorted(cfg.prune_rates), desc="share sweep", disable=not progress):
            for ws in (False, True):
                # one variant at a time, pruned afresh (global pruning is deterministic), shared on
                # the masked copy, then folded: base plus one masked copy at most on the device
                m = pruned(base, "global", r)
                if ws:
                    share.weight_share(m, share_bits(cfg))
                prune.make_permanent(m)
                report = sizes.size_report(m)
                rt = runtime_of(cfg, m)
                rows.append(dict(rate=r, shared=ws, accuracy=train.evaluate(m, splits.test, runtime=rt),
                                 robust_accuracy=attacks.robust_accuracy(m, splits.test, attacks.fgsm, cfg.epsilon,
                                                                         runtime=rt),
                                 dense_bytes=report["dense_bytes"],
                                 approx_bytes=report["shared_approx_bytes"] if ws else report["approx_bytes"],
                                 file_bytes=report["file_bytes"], entropy_bytes=report["entropy_bound_bytes"]))
                del m
        return None, {"rows": rows}

    check = artifacts.rows_with("rate", "shared", "accuracy", "robust_accuracy", "dense_bytes", "approx_bytes",
                                "file_bytes", "entropy_bytes")
    _, metrics, hit = artifacts.cached(cfg, "share_sweep", SHARE_FIELDS, compute, check=check, kind=kind_of(cfg, base))
    return metrics["rows"], hit


def vgg16_formula(cfg: Config, rate: float = 0.5) -> list[dict[str, Any]]:
    """The paper's size formula for torchvision's VGG16 (1000 classes) at each seed of
    ``cfg.seeds``: unpruned (32-bit non-zeros, the Table 1 baseline's 534.3), and pruned globally
    at ``rate`` then counted as weight-shared with ``share_bits(cfg)`` (Table 1's 45.5). Only
    the non-zero counts matter, and they depend a little on the random initialisation (which
    weights global pruning keeps), so no weights are shared and no file is written: a few
    seconds per seed. Cached. Used by chapter 02.
    """
    import torchvision

    from . import share

    def compute():
        rows = []
        for s in cfg.seeds:
            torch.manual_seed(s)
            m = torchvision.models.vgg16().eval()
            dense = sizes.approx_size_mb(m, unit="MiB")
            prune.global_unstructured(m, rate, masks=False)  # counts only: a quarter of the time
            rows.append(dict(seed=s, rate=rate, dense_mib=dense,
                             pruned_mib=sizes.approx_size_mb(m, unit="MiB"),
                             shared_mib=share.shared_size_mb(m, share_bits(cfg), unit="MiB")))
            del m
        return None, {"rows": rows}

    names = ("seeds", "conv_bits", "linear_bits", "prune_rate")
    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    check = artifacts.rows_with("seed", "rate", "dense_mib", "pruned_mib", "shared_mib")
    _, metrics, _ = artifacts.cached(step_cfg, "vgg16_formula", names, compute, check=check, kind=HOST_KIND)
    return metrics["rows"]


SIZE_STAND_IN = dict(model="vgg_small", width=8, hidden=64, batch_norm=False, dropout=0.5, num_classes=1000,
                     input_shape=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3)  # size_model="small"


def size_model(cfg: Config) -> nn.Module:
    """The model whose real compressed file chapter 02 writes, by ``cfg.size_model``:
    torchvision's VGG16 (``"vgg16"``, randomly initialised: no pretrained weights can be
    downloaded on the project machines) or ``SIZE_STAND_IN`` (``"small"``: VGG16's 13
    convolutions and 3 linear layers at 1/8 width, for tests; the same steps in a second).
    Seeded with 0. Used by chapter 02."""
    import torchvision

    torch.manual_seed(0)
    return (torchvision.models.vgg16() if cfg.size_model == "vgg16" else models.from_spec(SIZE_STAND_IN)).eval()


def vgg16_sizes(cfg: Config, rates=(0.5, 0.925), progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """The four sizes of :func:`size_model` after global pruning at each of ``rates`` and weight
    sharing with ``share_bits(cfg)``; also the seconds to share, encode and decode. Cached
    (the shapes, not the data, decide these sizes; for torchvision's VGG16 this takes about 30 s
    once). The masks are folded before the file is written, so the shared model and its
    reloaded copy are two plain VGG16s on the host.

    Used by chapter 02.
    """
    import tempfile
    import time

    from . import share

    def compute():
        rows = []
        for r in tqdm(rates, desc="VGG16 sizes", disable=not progress):
            m = size_model(cfg)
            prune.global_unstructured(m, r)
            t0 = time.perf_counter()
            share.weight_share(m, share_bits(cfg))
            share_seconds = time.perf_counter() - t0
            prune.make_permanent(m)  # weight_orig, mask and weight are three VGG16s: keep one
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/vgg16.rclib"
                codec.save_compressed(m, path)
                t2 = time.perf_counter()
                back = codec.load_compressed(path, size_model(cfg))
                t3 = time.perf_counter()
            a, b = sizes.effective_state(m), sizes.effective_state(back)
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            report = sizes.size_report(m)
            rows.append(dict(rate=r, nonzero=sizes.nonzero_parameters(m), dense_bytes=report["dense_bytes"],
                             approx_bytes=report["approx_bytes"], shared_approx_bytes=report["shared_approx_bytes"],
                             file_bytes=report["file_bytes"], entropy_bytes=report["entropy_bound_bytes"],
                             share_seconds=share_seconds, encode_seconds=t2 - t1, decode_seconds=t3 - t2,
                             exact=bool(same)))
            del m, back
        return None, {"rows": rows}

    names = ("conv_bits", "linear_bits", "size_model")
    step_cfg = dataclasses.replace(cfg, prune_rates=tuple(rates))
    check = artifacts.rows_with("rate", "nonzero", "dense_bytes", "approx_bytes", "shared_approx_bytes",
                                "file_bytes", "entropy_bytes", "share_seconds", "encode_seconds",
                                "decode_seconds", "exact")
    _, metrics, hit = artifacts.cached(step_cfg, "vgg16_sizes", names + ("prune_rates",), compute, check=check,
                                       kind=HOST_KIND)
    return metrics["rows"], hit
