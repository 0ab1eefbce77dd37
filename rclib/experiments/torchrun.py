"""Table 1's retraining steps, their robust evaluation and Alg 5's trajectory on N processes
(``python -m rclib retrain|evaluate`` under torchrun), writing the very artifacts the chapters
read, under the same keys. How the processes cooperate (group, masks, data shards, BatchNorm,
randomness, writing) is described in :mod:`rclib.experiments.distributed`, whose primitives this
module uses.

With one process it calls :func:`rclib.experiments.retrain.retrained`,
:func:`rclib.experiments.retrain.evaluated` and
:func:`rclib.experiments.pruning.iterative_trajectory` unchanged: exactly the chapters' numbers.

Used by ``rclib.__main__`` (the README's "Scaling out with torchrun").
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from rclib.core import accel, artifacts
from rclib.core.accel import unwrap
from rclib.core.config import Config
from rclib.data import datasets
from rclib.experiments import operating, pruning, retrain, steps
from rclib.experiments.distributed import (
    COMMANDS,
    DEFAULT_JOIN_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    Context,
    agree,
    average_batchnorm,
    barrier,
    check_identical,
    context,
    from_rank0,
    gather_in_order,
    process_group,
    reduce_history,
    say,
    test_shard,
    train_shard,
    wrap,
)
from rclib.experiments.variants import RETRAININGS, Retraining
from rclib.nn import masks


def _usable(path, check: Callable, expect: dict | None = None) -> tuple[dict, dict] | None:
    found = artifacts.load(path, expect)
    if found is None:
        return None
    try:
        check(*found)
    except artifacts.CHECK_ERRORS:
        return None  # rank 0's artifacts.cached will warn, discard and replace it
    return found


def _read(ctx: Context, path, what: str, expect: dict | None = None) -> tuple[dict, dict]:
    """The artifact rank 0 wrote, as another rank reads it after the barrier (its recorded key
    material compared with ``expect``, :func:`rclib.core.artifacts.record`)."""
    found = artifacts.load(path, expect)
    if found is None:
        raise RuntimeError(f"rank {ctx.rank} finds no {what} at {path} after rank 0 wrote it; RCLIB_ARTIFACTS "
                           f"must name a folder every node sees (a shared file system)")
    return found


def baseline(ctx: Context, cfg: Config, splits, progress: bool = False) -> nn.Module:
    """The baseline on ``ctx.device`` on every rank: rank 0 loads it, or trains and writes it
    alone when missing; the others wait, then read it. Checked identical across ranks.
    Used by :func:`run`."""
    if ctx.rank == 0:
        base, _, hit = steps.baseline(cfg, splits, ctx.device, progress=progress)
        say(ctx, f"baseline {'read from' if hit else 'trained and written to'} the cache")
    barrier(ctx)
    if ctx.rank != 0:  # what steps.baseline returns on a cache hit
        key = dict(cfg=cfg, step=steps.BASELINE, kind=accel.compute_kind(cfg, ctx.device))
        tensors, _ = _read(ctx, artifacts.location(**key), "baseline", artifacts.record(**key))
        base = steps.rebuild(cfg, splits, tensors, ctx.device, accel.runtime(cfg, ctx.device), what="the baseline")
    check_identical(ctx, base, "the baseline")
    return base


def _train(ctx: Context, cfg: Config, splits, base: nn.Module, rate: float, how: Retraining,
           progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model = retrain.pruned_copy(base, rate)
    check_identical(ctx, model, "the pruned model (weights and masks)")
    loader = train_shard(ctx, splits.train, cfg.seed)
    ddp = wrap(ctx, model)
    history = retrain.retrain_in_place(dataclasses.replace(cfg, seed=cfg.seed + ctx.rank), ddp, loader, how,
                                       progress and ctx.rank == 0, steps.runtime_of(cfg, base))
    model = unwrap(ddp)
    average_batchnorm(ctx, model)
    history = reduce_history(ctx, history, len(loader.sampler))
    agree(ctx, how.name)
    return masks.effective_state(model), {"history": history, "world_size": ctx.world,
                                          "batch_per_process": loader.batch_size}


def retrained(ctx: Context, cfg: Config, splits, base: nn.Module, rate: float, how: Retraining,
              progress: bool = False) -> dict[str, torch.Tensor]:
    """:func:`rclib.experiments.retrain.retrained` on ``ctx.world`` processes: the same artifact, the same
    key; trained with DDP unless rank 0 finds it cached. Returns the state on every rank.
    Used by ``python -m rclib retrain`` (through :func:`run`) and :func:`evaluated`."""
    step = how.name
    if ctx.world == 1:
        state, metrics, hit = retrain.retrained(cfg, splits, base, rate, how, progress)
        say(ctx, f"{step} at r={rate:g}, seed {cfg.seed}: {'read from' if hit else 'written to'} the cache")
        return state
    key, check = retrain.artifact(cfg, rate, how, base), retrain.state_check(base, how)
    path = artifacts.location(**key)
    found = _usable(path, check, artifacts.record(**key)) if ctx.rank == 0 else None
    if not from_rank0(ctx, found is not None):
        state, metrics = _train(ctx, cfg, splits, base, rate, how, progress)
        if ctx.rank == 0:
            found = artifacts.cached(**key, compute=lambda: (state, metrics), check=check)[:2]
            say(ctx, f"{step} at r={rate:g}, seed {cfg.seed}: wrote {path}")
    barrier(ctx)  # the others wait for rank 0's artifact
    if ctx.rank != 0:
        found = _read(ctx, path, f"{step!r} model", artifacts.record(**key))
        say(ctx, f"{step} at r={rate:g}, seed {cfg.seed}: read {path}")
    return found[0]


def evaluated(ctx: Context, cfg: Config, splits, base: nn.Module, rate: float, how: Retraining,
              progress: bool = False) -> dict[str, Any]:
    """:func:`rclib.experiments.retrain.evaluated` on ``ctx.world`` processes: each rank attacks its shard
    of the test set, outcomes are gathered in test order and rank 0 writes the same artifact
    (retraining the model first when it is not cached). Returns the counts on every rank.
    Used by ``python -m rclib evaluate`` (through :func:`run`)."""
    step = how.name
    if ctx.world == 1:
        _, metrics, hit = retrain.evaluated(cfg, splits, base, rate, how, progress)
        say(ctx, f"evaluated {step} at r={rate:g}, seed {cfg.seed}: {'read from' if hit else 'written to'} the cache")
        return metrics
    key = retrain.evaluation_artifact(cfg, rate, how, base)
    path = artifacts.location(**key)
    found = _usable(path, retrain.evaluation_check, artifacts.record(**key)) if ctx.rank == 0 else None
    if not from_rank0(ctx, found is not None):
        state = retrained(ctx, cfg, splits, base, rate, how, progress)
        loader, keep = test_shard(ctx, splits.test)
        rt = steps.runtime_of(cfg, base)
        model = steps.rebuild(cfg, splits, state, ctx.device, rt, what=step)
        mine = retrain.outcomes(model, loader, cfg.epsilon, cfg.seed + ctx.rank, rt)
        n = len(splits.test.dataset)
        tensors = {k: gather_in_order(ctx, v[:keep].to(torch.uint8), n) for k, v in mine.items()}
        metrics = retrain.counts(tensors, cfg.epsilon, ctx.world)
        agree(ctx, f"evaluated-{step}")
        if ctx.rank == 0:
            found = artifacts.cached(**key, compute=lambda: (tensors, metrics), check=retrain.evaluation_check)[:2]
            say(ctx, f"evaluated {step} at r={rate:g}, seed {cfg.seed}: wrote {path}")
    barrier(ctx)
    if ctx.rank != 0:
        found = _read(ctx, path, f"evaluation of {step!r}", artifacts.record(**key))
    return found[1]


TRAJECTORY_STEP = "alg5"  # command-line name of Alg 5's iterative retraining (pruning.iterative_trajectory)


def trajectory(ctx: Context, cfg: Config, splits, base: nn.Module, rates: list[float], progress: bool = False) -> None:
    """:func:`rclib.experiments.pruning.iterative_trajectory` on ``ctx.world`` processes: the same artifact
    under the same key (chapters 01 and 03 read it); every retrain step of Alg 5 runs with DDP
    on a ``DistributedSampler`` shard, the channel masks are checked identical across ranks
    before each, and rank 0 writes after every rank agreed. Used by ``python -m rclib retrain
    --step alg5`` (through :func:`run`)."""
    if ctx.world == 1:
        pruning.iterative_trajectory(cfg, splits, base, rates)
        say(ctx, f"alg5 through r={', '.join(f'{r:g}' for r in sorted(rates))}, seed {cfg.seed}: cached")
        return
    key = pruning.trajectory_artifact(cfg, base, rates)
    check = pruning.trajectory_check(rates)
    path = artifacts.location(**key)
    found = _usable(path, check, artifacts.record(**key)) if ctx.rank == 0 else None
    if not from_rank0(ctx, found is not None):
        def retrain(model: nn.Module) -> None:  # Alg 5's retrain(), data-parallel
            check_identical(ctx, model, "the channel-pruned model (weights and masks)")
            ddp = wrap(ctx, model)
            rank_cfg = dataclasses.replace(cfg, seed=cfg.seed + ctx.rank)  # as _train: own dropout draws
            steps.retrainer(rank_cfg, splits, loader=train_shard(ctx, splits.train, cfg.seed))(ddp)
            average_batchnorm(ctx, unwrap(ddp))

        result = pruning.trajectory_tensors(pruning.trajectory_run(cfg, base, rates, retrain))
        agree(ctx, TRAJECTORY_STEP)
        if ctx.rank == 0:
            artifacts.cached(**key, compute=lambda: result, check=check)
            say(ctx, f"alg5, seed {cfg.seed}: wrote {path}")
    barrier(ctx)
    if ctx.rank != 0:
        _read(ctx, path, "Alg 5 trajectory", artifacts.record(**key))
        say(ctx, f"alg5, seed {cfg.seed}: read {path}")


def run(command: str, cfg: Config, names: list[str], rates: list[float], seeds: list[int],
        timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True,
        env: Mapping[str, str] | None = None, join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> list[dict[str, Any]]:
    """``python -m rclib retrain|evaluate``: every step of ``names`` (``variants.RETRAININGS``
    names, or ``TRAJECTORY_STEP``) at every rate for every seed, on the
    processes torchrun started (or this one). Returns one row per (seed, rate, step) with the
    evaluation counts for ``evaluate`` and the step's seconds; rank 0 prints them. Used by
    ``rclib.__main__``."""
    if command not in COMMANDS:
        raise ValueError(f"command={command!r} is not allowed: one of {', '.join(COMMANDS)}")
    ctx = context(os.environ if env is None else env, cfg.device, timeout_s, join_timeout_s)
    rows = []
    with process_group(ctx):
        say(ctx, f"{command} on {ctx.device} ({ctx.backend if ctx.world > 1 else 'one process'})")
        if cfg.epsilon == "match":  # the chapters' epsilon: rank 0 finds it (or reads chapter 00's), then all read it
            if ctx.rank == 0:
                operating.operating_point(cfg, ctx.device)
            barrier(ctx)
            cfg = operating.operating_point(cfg, ctx.device).apply(cfg)
        for seed in seeds:
            cfg_s = dataclasses.replace(cfg, seed=seed)
            accel.configure_torch(cfg_s)
            splits = datasets.load(cfg_s, ctx.device)
            base = baseline(ctx, cfg_s, splits, progress and ctx.rank == 0)
            if TRAJECTORY_STEP in names:  # one trajectory through every rate
                started = time.perf_counter()
                trajectory(ctx, cfg_s, splits, base, rates, progress)
                rows.append(dict(seed=seed, rates=list(rates), step=TRAJECTORY_STEP,
                                 seconds=time.perf_counter() - started))
                if ctx.rank == 0:
                    print(f"  {TRAJECTORY_STEP} seed {seed}: {rows[-1]['seconds']:.1f} s", flush=True)
            for rate in rates:
                for step in (s for s in names if s != TRAJECTORY_STEP):
                    started = time.perf_counter()
                    row = dict(seed=seed, rate=rate, step=step)
                    if command == "retrain":
                        retrained(ctx, cfg_s, splits, base, rate, RETRAININGS[step], progress)
                    else:
                        row.update(evaluated(ctx, cfg_s, splits, base, rate, RETRAININGS[step], progress))
                    row["seconds"] = time.perf_counter() - started
                    if ctx.rank == 0:
                        counts = "".join(f"  {k} {row[k]['correct']}/{row[k]['n']}" for k in retrain.EVAL_ATTACKS
                                         if k in row)
                        print(f"  {step} r={rate:g} seed {seed}: {row['seconds']:.1f} s{counts}", flush=True)
                    rows.append(row)
    sys.stdout.flush()
    return rows
