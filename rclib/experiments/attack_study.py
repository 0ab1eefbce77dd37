"""Chapter 05's study: every model of Table 1 (and a Madry-style row) under attacks stronger
than FGSM, their per-example worst case, transfer and gradient-masking checks (the paper's
future work, Sec. 4.1). A cached step per seed on top of :mod:`rclib.experiments.steps`'s Table 1 models.

Used by chapter 05.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rclib.core import accel, artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.experiments import retrain, table1
from rclib.experiments.steps import kind_of, rebuild, runtime_of
from rclib.experiments.variants import ABLATION, BASELINE, MADRY, RETRAINED, TABLE1, Variant
from rclib.robust import attacks, strong

VARIANTS = TABLE1 + ABLATION + (MADRY,)  # every model chapter 05 attacks, in the table's order
CURVE_VARIANTS = TABLE1 + (MADRY,)
TABLE = Step("attack_table", table1.READS + ("prune_rate", "strong"))
# Budgets. The cheap rclib attacks (FGSM, PGD-10, PGD-50 with 2 restarts) run on every digit of the
# sample. The ART attacks run as AutoAttack runs them, each on the digits that every attack before
# it left standing (Croce & Hein, 2020): APGD-CE at AutoAttack's 100 steps, then targeted APGD-T at
# 100 steps per target, then black-box Square. ART's APGD costs about 40 ms a step per batch on
# one CPU thread whatever the batch holds (measured: 100 steps on 100 digits 8.4 s, and 9 targets
# 36 s, on a cpu-profile baseline), so the cascade is what makes AutoAttack's step count
# affordable: a digit already broken costs nothing more. The budgets are Config fields (apgd_steps,
# apgd_targets, square_queries): AutoAttack's 100 steps in the cpu profile, fewer in smoke.
PGD_STEPS, PGD_LONG, PGD_RESTARTS = 10, 50, 2
LARGE_EPS, NEAR_ZERO = 0.5, 0.05  # at eps 0.5 a gradient can move every pixel to mid-grey
CHEAP_ATTACKS = ("FGSM", "PGD-10", f"PGD-{PGD_LONG} x{PGD_RESTARTS}")
CASCADE = (("+ APGD-CE", "apgd-ce"), ("+ APGD-T", "apgd-t"), ("+ Square", "square"))
TABLE_ATTACKS = ("clean",) + CHEAP_ATTACKS + tuple(name for name, _ in CASCADE) + ("worst case",)
TRANSFER_SOURCES = (BASELINE, RETRAINED)  # the surrogates whose PGD-10 examples transfer


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside, the caller's count restored afterwards. Attacks on batches
    of small digits ran faster so (chapter 05: 46 s a seed with one thread, 67 s with two), and
    the numbers no longer depend on the thread count. Used by chapters 05 and 06."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attack_subset(cfg: Config, n_test: int) -> torch.Tensor:
    """The sorted indices of ``cfg.attack_sample`` test digits (all when fewer) that chapter 05's
    expensive attacks use: a sample drawn with ``cfg.seed``, so every model of a seed meets the
    same digits and the worst case over attacks is taken per digit. Used by chapter 05."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(n_test, generator=g)[:min(cfg.attack_sample, n_test)].sort().values


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def zero_gradient_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per input, True where the input gradient of the cross-entropy is exactly zero: a saturated
    softmax (or a dead path) gives gradient attacks nothing to follow there, the classic sign of
    gradient masking. Eval mode makes examples independent, so a batch gradient is per example.
    Used by chapter 05 (:func:`zero_gradient_batches` streams the same over a loader)."""
    return zero_gradient_batches(model, _batches(x, y, batch_size))


def zero_gradient_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """:func:`zero_gradient_inputs` over ``(x, y)`` batches (a test loader), holding one batch at a
    time. Used by :func:`attack_table` (chapter 05)."""
    device = next(model.parameters()).device
    out = []
    for xb, yb in batches:
        g = attacks.input_gradient(model, xb.to(device), yb.to(device))
        out.append((g.flatten(1).abs().amax(1) == 0).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def test_batches(cfg: Config, dataset: Dataset, batch_size: int, device: Any = "cpu") -> DataLoader:
    """The test set in its fixed order, ``batch_size`` examples a batch, read (or decoded) as it
    is consumed: at 224 px the whole 10k-image test set is 6 GB of float32, so chapter 05 never
    holds it at once. Loader options follow ``cfg`` (``datasets.loader_options``). Used by
    :func:`attack_table`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **datasets.loader_options(cfg, device, dataset))


def take(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of the examples ``indices`` of ``dataset`` (a small sample: chapter 05's
    :func:`attack_subset`), read one by one without touching the others."""
    items = [dataset[int(i)] for i in indices]
    if not items:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)


def craft_into(spool: "Spool", source: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               eps: float, generator: torch.Generator) -> None:
    """PGD-10 examples crafted on ``source`` for every batch, appended to ``spool`` as they come
    (one batch in memory). Used by :func:`attack_table` (chapter 05's transfer examples)."""
    device = next(source.parameters()).device
    for x, y in batches:
        spool.append(attacks.pgd(source, x.to(device), y.to(device), eps, steps=PGD_STEPS, generator=generator), y)


class Spool:
    """Adversarial examples written batch by batch to a ``.npy`` file and read back one batch at a
    time: chapter 05's transfer examples (PGD-10 crafted on a surrogate, then fed to every other
    model). At 224 px they are 6 GB of float32 per surrogate, too much to keep in memory for two
    surrogates and the test set together; on disk they cost one write and one read per model.
    float32 is stored as it is, so what is read back is bit for bit what was crafted.

    Iterating yields ``(x, y)`` CPU batches with the sizes they were written with. Used by
    :func:`attack_table` (chapter 05)."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]):
        self.path = Path(path)
        self._images = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, *shape))
        self._labels = torch.zeros(n, dtype=torch.long)
        self._sizes: list[int] = []

    def append(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Write one batch after the ones written before."""
        start = sum(self._sizes)
        self._images[start:start + len(y)] = x.detach().to("cpu", torch.float32).numpy()
        self._labels[start:start + len(y)] = y.detach().cpu()
        self._sizes.append(len(y))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._images.flush()
        start = 0
        for size in self._sizes:
            yield torch.from_numpy(np.array(self._images[start:start + size])), self._labels[start:start + size]
            start += size

    def close(self) -> None:
        """Drop the file mapping (the file goes with its temporary folder)."""
        del self._images


def madry_model(cfg: Config, splits: datasets.Splits, base: nn.Module, rate: float) -> nn.Module:
    """Algorithm 7 with PGD examples instead of FGSM (``variants.MADRY_STEPS`` steps, random
    start, the same ``adv_epsilon``, margin weight, optimiser and ``adv_epochs`` as Table 1's Alg 7
    row), from the same globally pruned copy of ``base``: the cached step ``alg7-pgd`` of
    :mod:`rclib.experiments.retrain`, in eval mode on ``base``'s device. Used by chapter 05."""
    state, _, _ = retrain.retrained(cfg, splits, base, rate, MADRY.retraining)
    return rebuild(cfg, splits, state, next(base.parameters()).device, what=MADRY.label)


def attack_table(cfg: Config, splits: datasets.Splits, base: nn.Module, rate: float,
                 progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Every model of Table 1 and its ablation (from ``table1.robust_table``) plus the Madry-style
    row (:func:`madry_model`), under every attack, for one seed (cached).

    Attacks, all L-infinity at ``cfg.epsilon`` unless said otherwise:

    * on the whole test set (``on="test"``): clean, FGSM, PGD-10 (rclib, random start), and for
      the masking checks PGD-10 examples crafted on each of ``TRANSFER_SOURCES`` (transfer) and
      the share of inputs with an exactly zero input gradient;
    * on :func:`attack_subset` (``on="subset"``, ``cfg.attack_sample`` digits; the cheap attacks again so
      every column of the worst case is on the same digits): PGD-50 with 2 restarts (rclib); then,
      as AutoAttack runs them, each on the digits that every earlier attack left standing,
      APGD-CE (``cfg.apgd_steps``), APGD-T (``cfg.apgd_targets`` targets x ``cfg.apgd_steps``) and
      Square (``cfg.square_queries`` queries, black-box) through ART (:mod:`rclib.robust.strong`); their columns
      ("+ APGD-CE", ...) are the worst case so far, and "worst case" is the per-digit worst case
      over all six attacks (clean accuracy is not an attack: a digit misclassified clean is
      misclassified by every attack anyway); PGD-10 from x at ``LARGE_EPS``; and the curves: FGSM
      and PGD-10 at each of ``cfg.epsilons`` for ``CURVE_VARIANTS``.

    The attacks (and the Madry row's training) run on one torch thread whatever ``cfg.threads``
    says (Table 1's models are trained before, with the caller's threads): on batches of 64 small
    digits a second thread cost more than it gained (one seed took 67 s with two threads and 46 s
    with one, on an otherwise idle 2-core machine), and one thread also makes the numbers
    independent of the thread count.

    Memory: the test set streams in batches (:func:`test_batches`) and the transfer examples of
    each surrogate wait on disk (:class:`Spool`, under :func:`spool_dir`, removed afterwards), so
    at 224 px the host holds a batch or two of images, not the 20-25 GB of the test set and two
    surrogates' examples as tensors; the disk holds 6 GB per surrogate meanwhile. The rows are
    those of the former all-in-memory computation (same batches, same draws; a test compares).

    Returns:
        ``(rows, cached)``; each row has ``variant, kind ("table" | "curve" | "check"), attack,
        eps, on, accuracy, n, source`` (accuracy in [0, 1]; for the zero-gradient row, the share of
        such inputs; ``source``: the surrogate model of a transfer row, else empty).

    Used by chapter 05.
    """
    def compute():
        # Table 1's models first, with the caller's threads: chapter 04 trains the same cached models
        _, states, _ = table1.robust_table(cfg, splits, base, rate, progress=False)
        with one_thread():
            return attack_everything(states)

    def attack_everything(states: dict[Variant, dict]):
        device = next(base.parameters()).device
        rt = runtime_of(cfg, base)  # bf16 classification on CUDA; attack gradients stay fp32 (accel)

        def model_of(v: Variant) -> nn.Module:  # one at a time: paper-scale models are 0.5 GB each
            if v == MADRY:
                return accel.prepare(madry_model(cfg, splits, base, rate), rt)
            return rebuild(cfg, splits, states[v], device, rt, what=v.label)
        # the test set streams batch by batch (at 224 px it is 6 GB of float32); only the small
        # attack subset is held as tensors
        dataset = splits.test.dataset
        test = test_batches(cfg, dataset, cfg.batch_size, device)
        eps = cfg.epsilon

        def gen() -> torch.Generator:  # every PGD run starts from the same seeded draws
            return torch.Generator(device=device).manual_seed(cfg.seed)

        with tempfile.TemporaryDirectory(prefix="transfer-", dir=spool_dir()) as folder:
            crafted = {}
            for i, src in enumerate(TRANSFER_SOURCES):  # crafted once per surrogate, spooled to disk
                g, source = gen(), model_of(src)
                crafted[src] = Spool(Path(folder) / f"{i}.npy", len(dataset), tuple(splits.input_shape))
                craft_into(crafted[src], source, test, eps, g)
                del source
            try:
                return attack_models(model_of, test, crafted, gen, device, rt)
            finally:
                for spool in crafted.values():
                    spool.close()

    def attack_models(model_of, test: DataLoader, crafted: dict[str, Spool], gen, device, rt):
        eps = cfg.epsilon
        idx = attack_subset(cfg, len(test.dataset))
        xs, ys = take(test.dataset, idx)  # the expensive attacks' few inputs, held as tensors
        sub = _batches(xs, ys, cfg.batch_size)
        rows: list[dict[str, Any]] = []
        outcomes: dict[str, torch.Tensor] = {}

        def add(v: Variant, kind, attack, e, on, correct, source: Variant | None = None):
            rows.append(dict(variant=v.label, kind=kind, attack=attack, eps=float(e), on=on,
                             accuracy=float(correct.float().mean()) if len(correct) else 0.0, n=len(correct),
                             source=source.label if source else ""))

        strong_kw = dict(apgd_steps=cfg.apgd_steps, targets=cfg.apgd_targets, square_queries=cfg.square_queries,
                         batch_size=cfg.batch_size, seed=cfg.seed)
        for v in progress_bar(VARIANTS, desc=f"attacks, seed {cfg.seed}", show=progress):
            m = model_of(v)
            per_test = {
                "clean": attacks.robust_correct(m, test, attacks.fgsm, 0.0, runtime=rt),
                "FGSM": attacks.robust_correct(m, test, attacks.fgsm, eps, runtime=rt),
                "PGD-10": attacks.robust_correct(m, test, attacks.pgd, eps, steps=PGD_STEPS, generator=gen(),
                                                runtime=rt),
            }
            for attack, c in per_test.items():
                add(v, "table", attack, 0.0 if attack == "clean" else eps, "test", c)
            per_sub = {k: v[idx] for k, v in per_test.items()}
            per_sub[CHEAP_ATTACKS[2]] = attacks.robust_correct(m, sub, attacks.pgd, eps, steps=PGD_LONG, runtime=rt,
                                                               restarts=PGD_RESTARTS, generator=gen())
            standing = strong.worst_case(*(per_sub[a] for a in CHEAP_ATTACKS))  # attacks only: clean is no attack
            for column, key in CASCADE:  # each ART attack on the digits every earlier attack left standing
                alive = standing.nonzero().flatten()
                if len(alive):
                    standing = standing.clone()
                    standing[alive] = strong.evaluate(m, (xs[alive], ys[alive]), key, eps, **strong_kw).correct
                per_sub[column] = standing
            per_sub["worst case"] = standing
            for attack, c in per_sub.items():
                add(v, "table", attack, 0.0 if attack == "clean" else eps, "subset", c)
                outcomes[f"{v.label}|{attack}"] = c.to(torch.uint8)
            for src in TRANSFER_SOURCES:
                if src != v:
                    add(v, "check", f"transfer PGD-10 from {src.label}", eps, "test",
                        attacks.robust_correct(m, crafted[src], lambda _m, xb, _y, _e: xb.to(device), eps,
                                               runtime=rt), source=src)
            # from x itself (no random start): only the gradient can move the digit, so a model whose
            # gradients are useless stays correct here and fails the check
            add(v, "check", "PGD-10 from x", LARGE_EPS, "subset",
                attacks.robust_correct(m, sub, attacks.pgd, LARGE_EPS, steps=PGD_STEPS, random_start=False,
                                       runtime=rt))
            add(v, "check", "zero input gradient", 0.0, "test",
                zero_gradient_batches(m, test_batches(cfg, test.dataset, cfg.eval_batch_size, device)))
            if v in CURVE_VARIANTS:
                for e in cfg.epsilons:  # the table's own outcomes where it has them: same digits, same runs
                    for attack, run in (("FGSM", dict(attack=attacks.fgsm)),
                                        ("PGD-10", dict(attack=attacks.pgd, steps=PGD_STEPS, generator=gen()))):
                        if e == 0:
                            c = per_sub["clean"]
                        elif e == eps:
                            c = per_sub[attack]
                        else:
                            c = attacks.robust_correct(m, sub, eps=float(e), runtime=rt, **run)
                        add(v, "curve", attack, e, "subset", c)
        outcomes["subset"] = idx
        return outcomes, {"rows": rows}

    def check(tensors, metrics):  # every model under every attack of the table, on the same digits
        artifacts.rows_with("variant", "kind", "attack", "eps", "on", "accuracy", "n", "source")(tensors, metrics)
        have = {(r["variant"], r["attack"]) for r in metrics["rows"] if r["kind"] == "table" and r["on"] == "subset"}
        missing = {(v.label, a) for v in VARIANTS for a in TABLE_ATTACKS} - have
        if missing:
            raise KeyError(f"rows lack {sorted(missing)[:3]}")

    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    _, metrics, hit = artifacts.cached(step_cfg, TABLE, compute, check=check, kind=kind_of(cfg, base))
    return [dict(r, seed=cfg.seed, rate=rate) for r in metrics["rows"]], hit


def spool_dir() -> Path:
    """Where chapter 05's transfer examples wait on disk while a seed's models are attacked: a
    folder beside the artifact cache (a fast local disk, not a RAM-backed /tmp), created on demand."""
    folder = artifacts.root() / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


MASKING_CHECKS = ("iterative at least as strong as one-step", "white-box at least as strong as transfer",
                  "black-box breaks nothing white-box missed", f"near zero at eps {LARGE_EPS:g} from x",
                  "no input with a zero gradient")


def masking_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The standard gradient-masking checks (Athalye et al., 2018; Carlini et al., 2019), one row
    per model, seed and check, from :func:`attack_table`'s rows. Each can fail:

    * iterative at least as strong as one-step: PGD-10 accuracy <= FGSM accuracy (test set);
    * white-box at least as strong as transfer: PGD-10 on the model <= PGD-10 examples crafted
      on every other source of ``TRANSFER_SOURCES`` (test set);
    * black-box breaks nothing white-box missed: Square, run on the digits that survived every
      gradient attack, breaks none of them (accuracy after Square = accuracy before it; subset).
      A black-box attack that succeeds where gradients failed is the classic sign of masking;
    * near zero at a large budget: PGD-10 started at x itself (no random start, so only the
      gradient moves the digit) at ``LARGE_EPS`` leaves at most ``NEAR_ZERO`` (subset);
    * no input with an exactly zero input gradient (test set).

    Each row: ``variant, seed, check, ours, against, passed`` (``ours`` and ``against`` in [0, 1],
    the two numbers compared; ``passed`` iff ``ours <= against``, except the black-box check,
    which passes iff they are equal). Used by chapter 05.
    """
    acc: dict[tuple, float] = {(r["variant"], r["seed"], r["kind"], r["attack"], r["eps"], r["on"]): r["accuracy"]
                               for r in rows}
    transfers: dict[tuple, list[float]] = {}
    for r in rows:
        if r["source"]:
            transfers.setdefault((r["variant"], r["seed"]), []).append(r["accuracy"])
    out = []
    for variant, seed in dict.fromkeys((r["variant"], r["seed"]) for r in rows):
        eps = next(r["eps"] for r in rows if r["variant"] == variant and r["attack"] == "FGSM" and r["kind"] == "table")

        def a(kind, attack, on, e=eps):
            return acc[(variant, seed, kind, attack, e, on)]

        pgd10 = a("table", "PGD-10", "test")
        transfer = min(transfers[(variant, seed)])
        # after every white-box attack, and after Square on what they left: equal unless Square broke more
        pairs = ((pgd10, a("table", "FGSM", "test")), (pgd10, transfer),
                 (a("table", "+ Square", "subset"), a("table", "+ APGD-T", "subset")),
                 (a("check", "PGD-10 from x", "subset", LARGE_EPS), NEAR_ZERO),
                 (a("check", "zero input gradient", "test", 0.0), 0.0))
        for check, (ours, against) in zip(MASKING_CHECKS, pairs):
            passed = ours == against if check == MASKING_CHECKS[2] else ours <= against
            out.append(dict(variant=variant, seed=seed, check=check, ours=ours, against=against, passed=bool(passed)))
    return out
