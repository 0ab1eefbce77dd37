"""Benchmark: FGSM and PGD throughput of rclib against ART and torchattacks, same model, same batch.

For each model (the ``cpu`` profile's vgg_small on 8x8 digits, untrained weights; a VGG16-sized
net, torchvision's VGG16 convolution stack with BatchNorm, at 3x32x32 and 10 classes) it times
FGSM and PGD-``steps`` (no random start, so all three compute the same examples) for

- rclib: ``attacks.fgsm`` / ``attacks.pgd``;
- ART 1.20.1: ``FastGradientMethod`` / ``ProjectedGradientDescent`` on ``rclib.robust.strong.classifier``
  (parameters frozen, as ``rclib.robust.strong`` runs it; ART's own default keeps parameter gradients on
  and is slower still);
- torchattacks (if ``/tmp/ta`` holds it: ``pip install --no-deps --target /tmp/ta torchattacks``;
  it cannot be installed beside the project, its ``requests~=2.25`` pin conflicts).

Times are CPU seconds of this process (``time.process_time``) on one thread: on a shared
2-core machine wall time mostly measures the other processes (measured: the same PGD call between
77 and 219 ms wall, 75-88 ms CPU). Each of ``--repeats`` rounds runs every library once, in a
rotated order; a round gives each peer the paired ratio peer time / rclib time (> 1: rclib
faster). The table shows median throughput, the median paired ratio, in how many rounds rclib
was faster, and the largest |difference| between rclib's adversarial examples and the peer's.
A two-sided sign test over the rounds says whether a PGD ratio below 1 is more than noise.

Run on demand: ``nice -n 10 .venv/bin/python bench/bench_attacks.py [--batch 64] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rclib.core import config
from rclib.nn import models  # noqa: E402
from rclib.robust import attacks, strong

TA_PATH = "/tmp/ta"


def digits_model() -> tuple[str, models.VGG, tuple[int, int, int]]:
    cfg = config.load("cpu")
    return "vgg_small (cpu profile), 1x8x8", models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,)).eval(), (1, 8, 8)


def vgg16_model() -> tuple[str, models.VGG, tuple[int, int, int]]:
    torch.manual_seed(0)
    spec = dict(model="vgg16", width=64, hidden=512, batch_norm=True, dropout=0.5, num_classes=10,
                input_shape=[3, 32, 32], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return "VGG16-bn convs, 3x32x32", models.from_spec(spec).eval(), (3, 32, 32)


def peers(model: torch.nn.Module, shape: tuple[int, ...], eps: float, alpha: float, steps: int):
    """name -> (fgsm(x, y), pgd(x, y)) for each library that is available."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    out: dict[str, tuple[Callable, Callable]] = {
        "rclib": (lambda x, y: attacks.fgsm(model, x, y, eps),
                  lambda x, y: attacks.pgd(model, x, y, eps, alpha=alpha, steps=steps, random_start=False)),
    }
    est = strong.classifier(model, shape, 10)

    def art(attack):
        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            flags = [p.requires_grad for p in model.parameters()]
            for p in model.parameters():  # as rclib.robust.strong runs ART: no backward into parameters
                p.requires_grad_(False)
            try:
                return torch.from_numpy(attack.generate(x.numpy(), y.numpy()))
            finally:
                for p, f in zip(model.parameters(), flags):
                    p.requires_grad_(f)
        return run

    out["ART"] = (art(FastGradientMethod(est, norm=np.inf, eps=eps, batch_size=4096)),
                  art(ProjectedGradientDescent(est, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                               num_random_init=0, batch_size=4096, verbose=False)))
    if os.path.isdir(TA_PATH):
        sys.path.insert(0, TA_PATH)
        try:
            import torchattacks

            out["torchattacks"] = (torchattacks.FGSM(model, eps=eps),
                                   torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False))
        except ImportError as e:  # pragma: no cover
            print(f"torchattacks not usable: {e}")
    return out


def bench(name: str, model: torch.nn.Module, shape: tuple[int, int, int], batch: int, steps: int,
          repeats: int, eps: float) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    alpha = 2.5 * eps / steps
    libs = peers(model, shape, eps, alpha, steps)
    rows = []
    for k, attack in enumerate(("FGSM", f"PGD-{steps}")):
        times: dict[str, list[float]] = {lib: [] for lib in libs}
        result = {}
        for lib, fns in libs.items():  # warm-up: first calls allocate and pick kernels
            result[lib] = fns[k](x, y)
        names = list(libs)
        for i in range(repeats):
            for lib in names[i % len(names):] + names[:i % len(names)]:  # nobody always goes first
                t = time.process_time()
                libs[lib][k](x, y)
                times[lib].append(time.process_time() - t)
        for lib in libs:
            ratios = [a / b for a, b in zip(times[lib], times["rclib"])]
            diff = (result[lib] - result["rclib"]).abs().max().item()
            rows.append((name, attack, lib, batch / statistics.median(times[lib]), statistics.median(ratios),
                         sum(q > 1 for q in ratios), len(ratios), diff))
    return rows


def sign_test(wins: int, n: int) -> float:
    """Two-sided p-value of ``wins`` of ``n`` under a fair coin (ties never happen in float time)."""
    tail = sum(math.comb(n, i) for i in range(0, min(wins, n - wins) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="examples per batch (the VGG16 net uses a quarter)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps")
    ap.add_argument("--repeats", type=int, default=40, help="rounds of timed runs on the digits model")
    ap.add_argument("--repeats-vgg16", type=int, default=6, help="rounds on the VGG16-sized net")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-vgg16", action="store_true", help="only the digits model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import art

    print(f"torch {torch.__version__}, ART {art.__version__}, {torch.get_num_threads()} thread(s), "
          f"eps {args.eps:.4f}, PGD alpha 2.5*eps/steps, no random start")
    rows = bench(*digits_model(), args.batch, args.steps, args.repeats, args.eps)
    if not args.no_vgg16:
        rows += bench(*vgg16_model(), max(args.batch // 4, 1), args.steps, args.repeats_vgg16, args.eps)
    head = ("model", "attack", "library", "examples/s", "time / rclib's", "rclib faster", "max |x_adv - rclib's|")
    table = [head] + [(m, a, lib, f"{r:,.0f}" if r >= 100 else f"{r:.2f}", f"{q:.2f}x",
                       "" if lib == "rclib" else f"{w}/{n}", f"{d:.1e}") for m, a, lib, r, q, w, n, d in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    pgd = [r for r in rows if r[1].startswith("PGD")]
    for m in dict.fromkeys(r[0] for r in pgd):
        fastest = min((r for r in pgd if r[0] == m and r[2] != "rclib"), key=lambda r: r[4])
        q, w, n = fastest[4], fastest[5], fastest[6]
        p = sign_test(w, n)
        verdict = "at least as fast" if q >= 1 else f"slower, {'within noise' if p >= 0.05 else 'beyond noise'}"
        print(f"{m}: the fastest peer ({fastest[2]}) takes {q:.2f}x rclib's PGD time, rclib faster in "
              f"{w}/{n} rounds (sign test p = {p:.2f}) -> rclib PGD {verdict}")


if __name__ == "__main__":
    main()
