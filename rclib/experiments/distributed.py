"""Scale-out with torchrun: how N processes cooperate on one cached step (the steps themselves
are in :mod:`rclib.experiments.torchrun`).

The paper retrained on 40k images for one epoch and names the full 1.28M-image training set as
future work; that outgrows one GPU. This module runs :mod:`rclib.experiments.retrain`'s steps with PyTorch's
own engine (``torch.distributed``, ``DistributedDataParallel``, launched by ``torchrun``) and
writes the very artifacts the chapters read, keyed the same way (``world_size`` is recorded in
their metrics).

With N > 1 processes (rank r of N; ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from torchrun):

* **Group.** NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU; every collective, barrier
  included, gives up after ``timeout_s`` seconds.
* **Baseline.** Rank 0 loads it from the cache, or trains it there alone if it is missing (one
  process, as a chapter would) and writes it; the others wait at a barrier, then read it. The
  artifact folder must therefore be one every node sees.
* **Masks.** Every rank prunes the same baseline with the same deterministic Alg 1, and a sha256
  of the pruned model (weights and masks) is compared across ranks before training. Training
  keeps them exactly zero as in one process: ``weight = weight_orig * mask`` (the gradient there
  is zero, and ``train.mask_gradients`` zeroes it again after DDP's all-reduce), and the saved
  state is computed from ``weight_orig * mask``, never from a weight left stale by the last step.
* **Data.** A ``DistributedSampler`` per split. Training: shuffled with ``cfg.seed`` and
  ``set_epoch`` each epoch, ``batch_size // N`` examples per rank, so the global batch (and the
  learning rate that goes with it) stays ``cfg.batch_size`` when N divides it; the sampler pads
  the last round with up to N - 1 repeated images so all ranks run the same number of steps.
  Evaluation: in order, the padding dropped, so every test image counts once.
* **BatchNorm.** On CUDA the model's BatchNorm layers become ``SyncBatchNorm``: batch
  statistics over the global batch, as in one process. On CPU, where PyTorch has no
  SyncBatchNorm, each rank normalises with its own ``batch_size // N`` examples, and the running
  statistics, kept per rank during training, are averaged over ranks at the end.
* **Randomness.** Rank r seeds dropout and PGD's random starts with ``cfg.seed + r``; the data
  order comes from the sampler. So N processes differ a little from one (batch composition, CPU
  BatchNorm, random draws; ``tests/test_distributed.py`` states the tolerance and why).
* **Alg 7's attacks** craft their examples on the unwrapped module (``accel.unwrap``), in eval mode:
  an input gradient through the DDP wrapper would start a gradient reduction that never finishes.
* **Metrics.** Training histories are example-weighted means over ranks; evaluations are
  per-example outcomes gathered in test order, hence counts that add up exactly.
* **Writing.** Only rank 0 writes, and only after every rank has reported success (an
  all-reduce that a failed rank never joins); the others wait at a barrier and then read the
  artifact. If a rank raises, it exits non-zero, torchrun stops the others, and nothing is
  written (``artifacts.save`` is atomic besides). Test hook: ``RCLIB_TEST_FAIL_RANK=r`` makes rank
  r raise just before that all-reduce (``r:STEP``: only before STEP's, e.g. ``1:alg7``).

Used by :mod:`rclib.experiments.torchrun` (``python -m rclib retrain`` and ``evaluate``; the
README's "Scaling out with torchrun").
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from rclib.core.config import resolve_device

DEFAULT_TIMEOUT_S = 1800
# joining the group: a peer that never comes (a crashed node, a wrong MASTER_ADDR) ends the wait
# after this, not after the 1800 s that long collectives (rank 0 training the baseline) may need
DEFAULT_JOIN_TIMEOUT_S = 300
FAIL_ENV = "RCLIB_TEST_FAIL_RANK"  # test hook, "r" or "r:step": rank r raises before rank 0 writes
COMMANDS = ("retrain", "evaluate")


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node,
    the torch ``device`` it computes on and the seconds any wait may last."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


class JoinFailed(RuntimeError):
    """The process group could not be formed (a peer never came within the join timeout, or
    the rendezvous address is unreachable); the message says which and how long was waited."""


MAX_WORLD = 1 << 20  # more processes than any cluster runs: a typo, refused before any wait


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, str(default)).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise ValueError(f"{name}={text[:20]!r} is not allowed: a whole number >= 0 (torchrun sets it)")
    return int(text)


def context(env: Mapping[str, str], device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
            join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> Context:
    """The :class:`Context` torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; rank 0 of 1 when
    they are absent) on ``device`` (``cfg.device``: with CUDA and several processes,
    ``cuda:LOCAL_RANK``). The variables must fit together: ``0 <= RANK < WORLD_SIZE``,
    ``LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE`` (when given), ``LOCAL_RANK <= RANK``, and
    with several processes a ``MASTER_ADDR`` and a ``MASTER_PORT`` in 1..65535. Raises
    ValueError naming the variables. Used by :func:`run` and ``python -m rclib`` (exit 2)."""
    rank, world, local = _env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0)
    if not 1 <= world <= MAX_WORLD or rank >= world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world} is not allowed: 0 <= RANK < WORLD_SIZE <= {MAX_WORLD}")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    if not local < local_world <= world or local > rank:
        raise ValueError(f"LOCAL_RANK={local}, LOCAL_WORLD_SIZE={local_world} with RANK={rank}, WORLD_SIZE={world} "
                         f"is not allowed: LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE and LOCAL_RANK <= RANK")
    if world > 1:
        if not env.get("MASTER_ADDR", "").strip():
            raise ValueError(f"MASTER_ADDR is not allowed to be missing with WORLD_SIZE={world}: the processes "
                             "meet there (launch with torchrun, which sets it)")
        port = env.get("MASTER_PORT", "").strip()
        if not (port.isascii() and port.isdigit() and 1 <= int(port[:6]) <= 65535):
            raise ValueError(f"MASTER_PORT={port[:20]!r} is not allowed with WORLD_SIZE={world}: a port in 1..65535")
    for name, value in (("timeout_s", timeout_s), ("join_timeout_s", join_timeout_s)):
        if not 0 < value < float("inf"):
            raise ValueError(f"{name}={value!r} is not allowed: a finite number of seconds > 0")
    kind = resolve_device(device)
    if kind == "cuda" and world > 1:
        visible = torch.cuda.device_count()
        if local >= visible:
            raise ValueError(f"LOCAL_RANK={local} is not allowed: this node sees {visible} GPU(s); "
                             f"start at most {visible} processes per node (--nproc_per_node)")
        kind = f"cuda:{local}"
    return Context(rank=rank, world=world, local_rank=local, device=kind, timeout_s=float(timeout_s),
                   join_timeout_s=float(join_timeout_s))


@contextmanager
def process_group(ctx: Context) -> Iterator[Context]:
    """Join torchrun's process group for the duration (nothing to do for one process). On
    success every rank passes a last barrier and leaves the group; on an error the group is left
    as it is (torchrun stops the other ranks; tearing down NCCL after a failure can block).
    Used by :func:`run`."""
    if ctx.world == 1:
        yield ctx
        return
    if ctx.device.startswith("cuda"):
        torch.cuda.set_device(ctx.device)
    # joining waits at most join_timeout_s; afterwards every collective gets timeout_s
    join = min(ctx.join_timeout_s, ctx.timeout_s)
    started = time.perf_counter()
    try:
        dist.init_process_group(ctx.backend, init_method="env://", rank=ctx.rank, world_size=ctx.world,
                                timeout=datetime.timedelta(seconds=join))
    except (RuntimeError, ValueError, OSError) as err:  # DistNetworkError, DistStoreError: RuntimeErrors
        reason = " ".join(str(err).split())[:200]
        raise JoinFailed(f"rank {ctx.rank} of {ctx.world} could not join the process group at "
                         f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                         f"{time.perf_counter() - started:.0f} s (--join-timeout {join:g}): {reason}") from None
    dist.set_timeout(datetime.timedelta(seconds=ctx.timeout_s))
    yield ctx
    barrier(ctx)
    dist.destroy_process_group()


def say(ctx: Context, message: str) -> None:
    """One line of progress, prefixed with the rank."""
    print(f"[rank {ctx.rank}/{ctx.world}] {message}", flush=True)


# ---- collectives, used by the steps below (each takes the context explicitly; the process
# group is torch's own state) ----

def _comm(ctx: Context) -> str:
    return ctx.device if ctx.backend == "nccl" else "cpu"  # NCCL moves only GPU tensors


def barrier(ctx: Context) -> None:
    """Wait for every rank, at most ``ctx.timeout_s`` seconds (gloo's monitored barrier names
    the ranks that did not arrive; NCCL's watchdog enforces the group's timeout)."""
    if ctx.world == 1:
        return
    if ctx.backend == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=ctx.timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()


def all_sum(ctx: Context, values: list[float]) -> list[float]:
    """Elementwise sums over ranks (float64)."""
    if ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm(ctx))
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(ctx: Context, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if ctx.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=_comm(ctx))
    dist.broadcast(t, src=0)
    return bool(t.item())


def agree(ctx: Context, step: str) -> None:
    """Every rank reached this point: the last collective before rank 0 writes ``step``'s
    artifact. A rank that failed never joins, so the others stop here (error or timeout) and
    nothing is written. Test hook: ``RCLIB_TEST_FAIL_RANK=r`` (or ``r:step``) makes rank r raise
    here (for that step only)."""
    if os.environ.get(FAIL_ENV) in (str(ctx.rank), f"{ctx.rank}:{step}"):
        raise RuntimeError(f"{FAIL_ENV}={os.environ[FAIL_ENV]}: rank {ctx.rank} fails on purpose before "
                           f"rank 0 writes {step!r} (test hook)")
    done = all_sum(ctx, [1.0])[0]
    if done != ctx.world:
        raise RuntimeError(f"only {done:g} of {ctx.world} ranks finished")


def digest(model: nn.Module) -> bytes:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes; masks included)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def check_identical(ctx: Context, model: nn.Module, what: str) -> None:
    """Raise on every rank unless ``model``'s state (weights, masks, buffers) is bit-identical
    on all of them."""
    if ctx.world == 1:
        return
    mine = torch.tensor(list(digest(model)), dtype=torch.int64, device=_comm(ctx))
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(everyone, mine)
    differ = [r for r, d in enumerate(everyone) if not torch.equal(d, everyone[0])]
    if differ:
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {differ}; every rank must start "
                           f"from the same baseline (same artifact folder, same rclib source)")


def gather_in_order(ctx: Context, shard: torch.Tensor, n: int) -> torch.Tensor:
    """The (n,) tensor whose entries ``r, r + N, r + 2N, ...`` are rank r's ``shard``, on every rank."""
    if ctx.world == 1:
        return shard
    size = -(-n // ctx.world)
    padded = torch.zeros(size, dtype=shard.dtype, device=_comm(ctx))
    padded[:len(shard)] = shard.to(padded.device)
    everyone = [torch.zeros_like(padded) for _ in range(ctx.world)]
    dist.all_gather(everyone, padded)
    full = torch.empty(n, dtype=shard.dtype)
    for r, part in enumerate(everyone):
        full[r::ctx.world] = part[:len(range(r, n, ctx.world))].cpu()
    return full


# ---- data and model ----

def _loader_like(loader: DataLoader, batch_size: int, sampler: DistributedSampler) -> DataLoader:
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=loader.pin_memory, persistent_workers=workers > 0 and loader.persistent_workers)


def train_shard(ctx: Context, loader: DataLoader, seed: int) -> DataLoader:
    """This rank's training loader: ``loader``'s dataset through a shuffling ``DistributedSampler``
    (seed ``seed``; ``train.fit`` calls ``set_epoch``), ``loader.batch_size // N`` per batch.
    Used by :func:`retrained` (``python -m rclib retrain``)."""
    if loader.batch_size < ctx.world:
        raise ValueError(f"batch_size={loader.batch_size} is not allowed with {ctx.world} processes: "
                         f"at least one example per process and batch")
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    return _loader_like(loader, loader.batch_size // ctx.world, sampler)


def test_shard(ctx: Context, loader: DataLoader) -> tuple[DataLoader, int]:
    """This rank's evaluation loader (``DistributedSampler`` in order: images r, r + N, ...) and
    how many of its images are real: the sampler's padding repeats up to N - 1 images at the end,
    which must not be counted twice. Used by :func:`evaluated` (``python -m rclib evaluate``)."""
    n = len(loader.dataset)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=False)
    mine = range(ctx.rank, n, ctx.world)
    if list(sampler)[:len(mine)] != list(mine):  # the layout gather_in_order relies on
        raise RuntimeError("DistributedSampler no longer hands out images r, r + N, ...; update test_shard")
    return _loader_like(loader, loader.batch_size, sampler), len(mine)


def wrap(ctx: Context, model: nn.Module) -> DistributedDataParallel:
    """``model`` in ``DistributedDataParallel``: SyncBatchNorm on CUDA (unless a BatchNorm carries
    a pruning mask, which the conversion would drop); no buffer broadcast at every forward pass
    (masks are identical already, and BatchNorm statistics are handled by ``average_batchnorm``).
    Used by :func:`retrained`."""
    cuda = ctx.device.startswith("cuda")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cuda and bns and not any(n.endswith("_mask") for m in bns for n, _ in m.named_buffers()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch >= 2.13 renamed the switch; the old name still works there but warns
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None, **no_sync)


@torch.no_grad()
def average_batchnorm(ctx: Context, model: nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their mean over ranks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(ctx.world)


def reduce_history(ctx: Context, history: list[dict[str, Any]], seen: int) -> list[dict[str, Any]]:
    """Per-epoch training metrics as means over every rank's ``seen`` examples (not a mean of
    percentages: each rank's value is weighted by its example count)."""
    out = []
    for row in history:
        keys = sorted(k for k in row if k != "epoch")
        sums = all_sum(ctx, [row[k] * seen for k in keys] + [float(seen)])
        out.append({"epoch": row["epoch"], **{k: s / sums[-1] for k, s in zip(keys, sums)}})
    return out


# ---- the steps ----


