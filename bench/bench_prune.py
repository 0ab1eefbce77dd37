"""Benchmark: pruning torchvision VGG16 (138M weights, random init) on this machine.

1. Global unstructured pruning (Alg 1): ``rclib.compress.prune.global_unstructured`` against rclib's
   before issue 15 (e46de29, frozen in ``bench/frozen/``) and
   ``torch.nn.utils.prune.global_unstructured(L1Unstructured)``, same model, same rate, in one
   run (rclib: fastest of 3 runs on fresh copies, torch: one run); the masks are checked to be
   identical (with torch: except at ties with the threshold).
2. Channel pruning + hardening (Alg 3 + 4): forward latency of the masked model against the
   hardened one, next to the FLOP ratio that bounds the speed-up.

Run on demand: ``.venv/bin/python bench/bench_prune.py [--rate 0.5] [--repeats 5]``
(``make bench`` runs every benchmark). Prints a table; takes a few minutes and ~3 GB of memory.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402
from frozen import prune_e46de29 as old_prune  # noqa: E402
from torch.nn.utils import prune as torch_prune  # noqa: E402

from rclib.compress import (
    harden,
    prune,  # noqa: E402
)
from rclib.nn import masks, models, timing


def vgg16() -> models.VGG:
    torch.manual_seed(0)
    spec = dict(model="vgg16", width=64, hidden=4096, batch_norm=False, dropout=0.5,
                num_classes=1000, input_shape=[3, 224, 224], mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225])
    return models.from_spec(spec).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.5, help="prune rate for both parts")
    ap.add_argument("--repeats", type=int, default=5, help="timed forward passes per latency")
    ap.add_argument("--prune-repeats", type=int, default=3, help="runs of rclib's pruning (best kept)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, rate {args.rate}")

    rows = []
    ours = vgg16()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    n = sum(m.weight.numel() for _, m in models.prunable_layers(ours))

    def fresh() -> models.VGG:
        m = vgg16()
        m.load_state_dict(state)
        return m

    def best_of(f, repeats: int) -> tuple[float, models.VGG]:
        """Fastest of ``repeats`` runs on fresh copies (this machine is shared: noise is one-sided)."""
        times = []
        for _ in range(repeats):
            model = fresh()
            t = time.perf_counter()
            f(model)
            times.append(time.perf_counter() - t)
        return min(times), model

    del ours
    t_ours, ours = best_of(lambda m: prune.global_unstructured(m, args.rate), args.prune_repeats)
    t_old, before = best_of(lambda m: old_prune.global_unstructured(m, args.rate), args.prune_repeats)
    same_as_old = all(torch.equal(a.weight_mask, b.weight_mask) for (_, a), (_, b)
                      in zip(models.prunable_layers(ours), models.prunable_layers(before)))
    del before
    t_torch, theirs = best_of(lambda m: torch_prune.global_unstructured(
        [(x, "weight") for _, x in models.prunable_layers(m)], pruning_method=torch_prune.L1Unstructured,
        amount=args.rate), 1)
    # torch.topk breaks ties among equal magnitudes arbitrarily: the masks may differ only at
    # weights whose magnitude equals the threshold (masks.mask_agreement checks exactly that)
    agreement = masks.mask_agreement(ours, theirs)
    rows.append(("Alg 1 global pruning, s", f"{t_ours:.2f}", f"{t_old:.2f} (rclib e46de29)",
                 f"{t_old / t_ours:.1f}x faster", f"same masks as before: {same_as_old}"))
    rows.append(("Alg 1 global pruning, s", f"{t_ours:.2f}", f"{t_torch:.2f} (torch.nn.utils.prune)",
                 f"{t_torch / t_ours:.1f}x faster",
                 f"zeros {agreement['zeros_ours']:,} vs {agreement['zeros_theirs']:,}; masks differ at "
                 f"{agreement['differ']:,} entries, all of them ties at the threshold: {agreement['ties_only']}; "
                 f"target <= 1 s and >= 20x torch: "
                 f"{'met' if t_ours <= 1 and t_torch / t_ours >= 20 else 'NOT met'}"))
    del theirs

    masked = vgg16()
    prune.channel_structured(masked, args.rate)
    hard = harden.harden(masked)
    shape = (3, 224, 224)
    flop_ratio = harden.flops(masked, shape) / harden.flops(hard, shape)
    with torch.no_grad():
        x = torch.rand(2, *shape)
        diff = (masked(x) - hard(x)).abs().max().item()
    for batch in (1, 16):
        t_masked = timing.latency(masked, shape, batch=batch, repeats=args.repeats, warmup=1)
        t_hard = timing.latency(hard, shape, batch=batch, repeats=args.repeats, warmup=1)
        rows.append((f"Alg 3+4 forward, batch {batch}, s", f"{t_hard:.3f} (hardened)",
                     f"{t_masked:.3f} (masked)", f"{t_masked / t_hard:.2f}x faster",
                     f"FLOP ratio {flop_ratio:.2f}x; max |diff| {diff:.1e}"))
    print(f"prunable weights: {n:,}; parameters masked {models.count_parameters(masked):,}, "
          f"hardened {models.count_parameters(hard):,}")
    header = ("measure", "rclib", "peer", "ratio", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
