"""Chapter 02's experiments: weight sharing (Alg 6) over prune rates, and the sizes of a real
VGG16 by the paper's formula (Eq 6-7) and by our compressed file.

Used by chapter 02.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch
import torchvision
from torch import nn

from rclib.compress import codec, prune, share, sizes
from rclib.core import artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.experiments.pruning import GLOBAL, pruned
from rclib.experiments.steps import BASELINE, HOST_KIND, kind_of, runtime_of, share_bits
from rclib.nn import masks, models, train
from rclib.robust import attacks

SHARE_SWEEP = Step("share_sweep", BASELINE.reads + ("prune_rates", "epsilon", "sharing"))
# the seeds only count how often the formula is evaluated: the paper's VGG16 is untrained
FORMULA = Step("vgg16_formula", ("seeds", "sharing", "prune_rate"))
SIZES = Step("vgg16_sizes", ("sharing", "sizes", "prune_rates"))


def share_sweep(cfg: Config, splits: datasets.Splits, base: nn.Module,
                progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Figure 5 data: global pruning at every rate of ``cfg.prune_rates``, without and with
    weight sharing (Alg 6, ``share_bits(cfg)``), cached.

    Each row: rate, shared, clean and FGSM (``cfg.epsilon``) test accuracy, and the four sizes of
    ``sizes.size_report`` (bytes): dense safetensors, the paper's formula (with the
    weight-shared count for shared rows), our compressed file and its entropy bound.

    Used by chapter 02.
    """
    def compute():
        rows = []
        for r in progress_bar(sorted(cfg.prune_rates), show=progress, desc="share sweep"):
            for ws in (False, True):
                # one variant at a time, pruned afresh (global pruning is deterministic), shared on
                # the masked copy, then folded: base plus one masked copy at most on the device
                m = pruned(base, GLOBAL, r)
                if ws:
                    share.weight_share(m, share_bits(cfg))
                masks.make_permanent(m)
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
    _, metrics, hit = artifacts.cached(cfg, SHARE_SWEEP, compute, check=check, kind=kind_of(cfg, base))
    return metrics["rows"], hit


def vgg16_formula(cfg: Config, rate: float = 0.5) -> list[dict[str, Any]]:
    """The paper's size formula for torchvision's VGG16 (1000 classes) at each seed of
    ``cfg.seeds``: unpruned (32-bit non-zeros, the Table 1 baseline's 534.3), and pruned globally
    at ``rate`` then counted as weight-shared with ``share_bits(cfg)`` (Table 1's 45.5). Only
    the non-zero counts matter, and they depend a little on the random initialisation (which
    weights global pruning keeps), so no weights are shared and no file is written: a few
    seconds per seed. Cached. Used by chapter 02.
    """
    def compute():
        rows = []
        for s in cfg.seeds:
            torch.manual_seed(s)
            m = torchvision.models.vgg16().eval()
            dense = sizes.approx_size_mb(m, unit="MiB")
            prune.global_unstructured(m, rate, masks=False)  # counts only: a quarter of the time
            rows.append(dict(seed=s, rate=rate, dense_mib=dense,
                             pruned_mib=sizes.approx_size_mb(m, unit="MiB"),
                             shared_mib=sizes.shared_size_mb(m, share_bits(cfg), unit="MiB")))
            del m
        return None, {"rows": rows}

    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    check = artifacts.rows_with("seed", "rate", "dense_mib", "pruned_mib", "shared_mib")
    _, metrics, _ = artifacts.cached(step_cfg, FORMULA, compute, check=check, kind=HOST_KIND)
    return metrics["rows"]


SIZE_STAND_IN = dict(model="vgg_small", width=8, hidden=64, batch_norm=False, dropout=0.5, num_classes=1000,
                     input_shape=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3)  # size_model="small"


def size_model(cfg: Config) -> nn.Module:
    """The model whose real compressed file chapter 02 writes, by ``cfg.size_model``:
    torchvision's VGG16 (``"vgg16"``, randomly initialised: no pretrained weights can be
    downloaded on the project machines) or ``SIZE_STAND_IN`` (``"small"``: VGG16's 13
    convolutions and 3 linear layers at 1/8 width, for tests; the same steps in a second).
    Seeded with 0. Used by chapter 02."""
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
    def compute():
        rows = []
        for r in progress_bar(rates, desc="VGG16 sizes", show=progress):
            m = size_model(cfg)
            prune.global_unstructured(m, r)
            t0 = time.perf_counter()
            share.weight_share(m, share_bits(cfg))
            share_seconds = time.perf_counter() - t0
            masks.make_permanent(m)  # weight_orig, mask and weight are three VGG16s: keep one
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/vgg16.rclib"
                codec.save_compressed(m, path)
                t2 = time.perf_counter()
                back = codec.load_compressed(path, size_model(cfg))
                t3 = time.perf_counter()
            a, b = masks.effective_state(m), masks.effective_state(back)
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            report = sizes.size_report(m)
            rows.append(dict(rate=r, nonzero=sizes.nonzero_parameters(m), dense_bytes=report["dense_bytes"],
                             approx_bytes=report["approx_bytes"], shared_approx_bytes=report["shared_approx_bytes"],
                             file_bytes=report["file_bytes"], entropy_bytes=report["entropy_bound_bytes"],
                             share_seconds=share_seconds, encode_seconds=t2 - t1, decode_seconds=t3 - t2,
                             exact=bool(same)))
            del m, back
        return None, {"rows": rows}

    step_cfg = dataclasses.replace(cfg, prune_rates=tuple(rates))
    check = artifacts.rows_with("rate", "nonzero", "dense_bytes", "approx_bytes", "shared_approx_bytes",
                                "file_bytes", "entropy_bytes", "share_seconds", "encode_seconds",
                                "decode_seconds", "exact")
    _, metrics, hit = artifacts.cached(step_cfg, SIZES, compute, check=check,
                                       kind=HOST_KIND)
    return metrics["rows"], hit
