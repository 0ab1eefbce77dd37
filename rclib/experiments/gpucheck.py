"""``python -m rclib gpu-check``: one bounded command that measures the ``paper`` setting on this device.

A GPU is lent to this project only now and then, for minutes, so the measurement is prepared:
on a generated ImageNet-like folder (real JPEG files) and torchvision's VGG16, it measures, stage
by stage, within ``--budget`` seconds (stages that would start after the budget is spent are
skipped and listed, and the report says it is partial):

* images per second of baseline training, evaluation, FGSM, PGD-10 and Algorithm 7's step, under
  the profile's runtime (bf16 autocast and channels_last, :mod:`rclib.core.accel`) and in fp32;
* agreement of bf16 with fp32: accuracy difference, share of equal predictions, share of FGSM
  example pixels that agree;
* JPEG decoding rate with the profile's loader workers, and whether training is decode-bound;
* peak device memory of each chapter's heaviest step at the ``paper`` batch sizes, and the largest
  ``eval_batch_size`` that fits (CUDA only: ``torch.cuda.max_memory_allocated``);
* a projection of the whole ``paper`` book on this device from those rates, arithmetic shown
  (:mod:`rclib.experiments.projection`).

It writes ``gpu-check.json`` and ``gpu-check.md`` (after every stage, so an interrupted run
leaves what it measured) and prints the table. On a CPU (``--size auto``) it runs the same code
at tiny sizes in seconds: that is how ``make test`` runs it. Used by the README's GPU section.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from PIL import Image

from rclib.core import accel, config
from rclib.core.accel import Runtime
from rclib.data import datasets
from rclib.experiments import projection, retrain
from rclib.nn import models, train
from rclib.robust import attacks, margin

OPS = ("train", "evaluate", "FGSM", "PGD-10", "Alg 7 step")


@dataclass(frozen=True)
class Sizes:
    """How big the check runs: ``FULL`` is the paper's model and inputs, ``TINY`` a CPU smoke run."""

    image_size: int  # crop of the inputs (paper: 224)
    width: int  # VGG16 first-block channels (paper: 64)
    hidden: int  # VGG16 hidden linear width (paper: 4096)
    classes: int  # generated class folders
    per_class: int  # generated JPEGs per class
    source_px: tuple[int, int]  # width, height of the JPEG files (ImageNet's are about 500x375)
    batch_size: int  # training batch (paper profile's)
    eval_batch_size: int  # evaluation and attack batch (paper profile's)
    workers: int  # loader processes decoding JPEGs (paper profile's)
    steps: int  # timed batches per measurement
    warmup: int  # untimed batches first (cuDNN picks its algorithms, caches fill)


PAPER = config.profile_config("paper")
FULL = Sizes(PAPER.image_size, PAPER.width, PAPER.hidden, 100, 24, (500, 375), PAPER.batch_size,
             PAPER.eval_batch_size, PAPER.num_workers, steps=8, warmup=2)
TINY = Sizes(32, 4, 32, 4, 6, (48, 40), 8, 8, 0, steps=2, warmup=1)


def make_folder(root: Path, s: Sizes, seed: int = 0) -> Path:
    """An ImageFolder of ``s.classes`` x ``s.per_class`` JPEGs (quality 90) of ``s.source_px``,
    smooth noise tinted per class, so decoding costs what a photo of that size costs. Reused when
    a previous run wrote the same one (``.complete`` names its sizes)."""
    stamp = json.dumps([s.classes, s.per_class, list(s.source_px), seed])
    done = root / ".complete"
    if done.is_file() and done.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)
    w, h = s.source_px
    for c in range(s.classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(s.per_class):
            coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)  # smooth, like a photo's regions
            pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
            pixels[..., c % 3] += 40
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / f"n{c:08d}" / f"img_{i:05d}.JPEG", quality=90)
    done.write_text(stamp)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(run: Callable[[int], object], images_per_batch: int, s: Sizes, device: torch.device) -> dict[str, float]:
    """Images per second of ``run(batches)``: ``s.warmup`` batches untimed, then ``s.steps`` timed."""
    run(s.warmup)
    sync(device)
    start = time.perf_counter()
    run(s.steps)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": s.steps * images_per_batch / seconds, "seconds": seconds,
            "images": s.steps * images_per_batch}


def throughput(cfg: config.Config, model: torch.nn.Module, rt: Runtime, x: torch.Tensor, y: torch.Tensor,
               s: Sizes, op: str) -> dict[str, float]:
    """One measurement of ``op`` (one of ``OPS``) on ``model`` with runtime ``rt``, the batch
    ``(x, y)`` repeated: the loops of chapters 00-05 (``train.fit``, ``train.evaluate``,
    ``attacks.robust_correct``, ``margin.adversarial_retrain``), not a re-implementation."""
    device = x.device
    xt, yt = x[:s.batch_size], y[:s.batch_size]
    xe, ye = x[:s.eval_batch_size], y[:s.eval_batch_size]
    gen = torch.Generator(device=device).manual_seed(0)
    runs: dict[str, tuple[Callable[[int], object], int]] = {
        "train": (lambda n: train.fit(model, [(xt, yt)] * n, 1, train.Optimiser.baseline(cfg), progress=False,
                                      runtime=rt), len(yt)),
        "evaluate": (lambda n: train.evaluate(model, [(xe, ye)] * n, runtime=rt), len(ye)),
        "FGSM": (lambda n: attacks.robust_correct(model, [(xe, ye)] * n, attacks.fgsm, cfg.epsilon, runtime=rt),
                 len(ye)),
        "PGD-10": (lambda n: attacks.robust_correct(model, [(xe, ye)] * n, attacks.pgd, cfg.epsilon, steps=10,
                                                    generator=gen, runtime=rt), len(ye)),
        "Alg 7 step": (lambda n: margin.adversarial_retrain(
            model, [(xt, yt)] * n, margin.Objective(cfg.adv_epsilon, cfg.margin_weight), 1,
            train.Optimiser.retraining(cfg), progress=False, runtime=rt), len(yt)),
    }
    run, per_batch = runs[op]
    return rate(run, per_batch, s, device)


def agreement(cfg: config.Config, model32: torch.nn.Module, model16: torch.nn.Module, rt: Runtime,
              x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """bf16 (``rt``) against fp32 on the same weights and inputs: accuracies, their difference,
    the share of equal predictions and of equal FGSM example pixels (attack gradients are fp32
    inside bf16 loops, :mod:`rclib.core.accel`, so only the layout and the classification differ)."""
    pred32 = train.predict(model32, x, len(x)).argmax(1)
    pred16 = train.predict(model16, x, len(x), runtime=rt).argmax(1)
    adv32 = attacks.fgsm(model32, x, y, cfg.epsilon)
    with accel.autocast(x.device, rt):
        adv16 = attacks.fgsm(model16, accel.to_device(x, x.device, rt), y, cfg.epsilon)
    y = y.cpu()
    acc32, acc16 = float((pred32 == y).float().mean()), float((pred16 == y).float().mean())
    return {"accuracy_fp32": acc32, "accuracy_bf16": acc16, "accuracy_difference": acc16 - acc32,
            "prediction_agreement": float((pred32 == pred16).float().mean()),
            "fgsm_pixel_agreement": float((adv32 == adv16).float().mean()), "images": len(y)}


def decode_rate(loader, batches: int) -> dict[str, float]:
    """Images per second that ``loader`` (JPEG decode, resize, crop in its workers) delivers,
    after its first batch (worker start-up is reported apart)."""
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    ready = time.perf_counter()
    n = 0
    for i, (x, _) in enumerate(it):
        n += len(x)
        if i + 2 >= batches:
            break
    seconds = time.perf_counter() - ready
    return {"images_per_s": n / seconds if n else len(first[0]) / (ready - start), "images": n,
            "seconds": seconds, "startup_s": ready - start, "workers": loader.num_workers}


def memory(cfg: config.Config, base: torch.nn.Module, rt: Runtime, x: torch.Tensor, y: torch.Tensor,
           s: Sizes) -> dict[str, Any]:
    """Peak device memory (GiB) of each chapter's heaviest step at the profile's batch sizes, the
    baseline resident beside a globally pruned copy (weights, masks), as the chapters hold them;
    and the largest ``eval_batch_size`` whose PGD step fits (from two measured sizes, then tried)."""
    device = x.device
    variant = accel.prepare(retrain.pruned_copy(base, cfg.prune_rate), rt)
    xt, yt, xe = x[:s.batch_size], y[:s.batch_size], x[:s.eval_batch_size]
    tiny_step = train.Optimiser("sgd", lr=1e-9)  # memory, not learning: the weights barely move
    steps = {
        "00 baseline: training step": lambda: train.fit(base, [(xt, yt)], 1, tiny_step, progress=False, runtime=rt),
        "01 pruning: retraining a pruned copy": lambda: train.fit(variant, [(xt, yt)], 1, tiny_step, progress=False,
                                                                   runtime=rt),
        "03 boundary: decision-map forward": lambda: train.predict(variant, xe, len(xe), runtime=rt),
        "04 Alg 7 step": lambda: margin.adversarial_retrain(variant, [(xt, yt)],
                                                            margin.Objective(cfg.adv_epsilon, cfg.margin_weight),
                                                            optimiser=tiny_step, progress=False, runtime=rt),
        "05 PGD-50 x2 restarts": lambda: attacks.pgd(variant, xt, yt, cfg.epsilon, steps=2, restarts=2),
    }
    gib = 1024 ** 3
    out: dict[str, Any] = {}
    for name, step in steps.items():
        torch.cuda.reset_peak_memory_stats(device)
        with accel.autocast(device, rt):
            step()
        out[name] = torch.cuda.max_memory_allocated(device) / gib

    def pgd_peak(b: int) -> float:
        xb = x[:1].expand(b, *x.shape[1:]).contiguous()
        torch.cuda.reset_peak_memory_stats(device)
        with accel.autocast(device, rt):
            attacks.robust_correct(variant, [(xb, y[:1].expand(b))], attacks.pgd, cfg.epsilon, steps=1, runtime=rt)
        return torch.cuda.max_memory_allocated(device)

    small, large = max(1, s.eval_batch_size // 2), s.eval_batch_size
    p1, p2 = pgd_peak(small), pgd_peak(large)
    per_image = max((p2 - p1) / (large - small), 1.0)
    total = torch.cuda.get_device_properties(device).total_memory
    fit = int((0.9 * total - (p1 - per_image * small)) // per_image)
    fit = max(32, fit // 32 * 32)
    try:
        pgd_peak(fit)
        tried = True
    except torch.OutOfMemoryError:
        tried, fit = False, fit // 2
    torch.cuda.empty_cache()
    return {"peak_gib": out, "eval_batch_size_fits": fit, "fit_verified": tried, "bytes_per_eval_image": per_image,
            "device_total_gib": total / gib}


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the check: device name, versions, date."""
    info = {"device": accel.device_kind(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "date_utc": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return info


def run(out: Path, budget_s: float = 480.0, size: str = "auto", device: str = "auto",
        progress: bool = True) -> dict[str, Any]:
    """The whole check (see the module docstring); returns the report it wrote to
    ``out/gpu-check.json`` and ``out/gpu-check.md``. ``size``: ``full`` (the paper's model and
    224 px), ``tiny``, or ``auto`` (full on CUDA, tiny elsewhere). Stages that would start after
    ``budget_s`` seconds are skipped and listed under ``skipped``; ``complete`` says whether any
    was. Used by ``python -m rclib gpu-check`` and ``make test`` (tiny, on the CPU)."""
    started = time.perf_counter()
    dev = torch.device(config.resolve_device(device))
    s = FULL if size == "full" or (size == "auto" and dev.type == "cuda") else TINY
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(dev), "sizes": asdict(s), "budget_s": budget_s,
                              "size": "full" if s == FULL else "tiny", "skipped": [], "complete": False}

    def say(text: str) -> None:
        if progress:
            print(f"[gpu-check {time.perf_counter() - started:6.1f} s] {text}", flush=True)

    folder = make_folder(out / f"folder-{report['size']}", s)
    cfg = config.load("paper", device=dev.type, data_dir=str(folder), image_size=s.image_size, width=s.width,
                      hidden=s.hidden, weights="none", epochs=1,  # random weights: the profile's epochs 0 would train nothing
                      batch_size=s.batch_size, eval_batch_size=s.eval_batch_size,
                      num_workers=s.workers, decoded_cache=False,
                      local_examples=min(PAPER.local_examples, s.classes))  # the tiny folder has few test images
    accel.configure_torch(cfg)
    splits = datasets.load(cfg, dev)
    x, y = datasets.first_batch(splits.test, s.eval_batch_size)
    reps = math.ceil(max(s.batch_size, s.eval_batch_size) / len(y))
    x, y = x.repeat(reps, 1, 1, 1).to(dev), y.repeat(reps).to(dev)
    base = models.build(cfg, splits.num_classes, splits.input_shape, splits.mean, splits.std)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    spec = base.spec
    del base
    runtimes = {"bf16 + channels_last": Runtime("bf16", channels_last=True, non_blocking=dev.type == "cuda"),
                "fp32": Runtime()}
    profile_rt = accel.runtime(cfg, dev)
    report["profile_runtime"] = next((k for k, v in runtimes.items() if v == profile_rt), "fp32")
    say(f"{report['environment']['device']}, {report['size']} sizes, budget {budget_s:g} s")

    def fresh(rt: Runtime) -> torch.nn.Module:
        return accel.prepare(models.from_state(spec, state, dev), rt)

    def stage(name: str, work: Callable[[], Any]) -> Any:
        if time.perf_counter() - started >= budget_s:
            report["skipped"].append(name)
            say(f"skipped {name}: the budget is spent")
            return None
        result = work()
        report["elapsed_s"] = time.perf_counter() - started
        write(out, report)
        say(f"done {name}")
        return result

    report["throughput"] = {}
    for label, rt in runtimes.items():
        model = fresh(rt)
        for op in OPS:
            # stage() calls the function at once; the defaults bind this loop's values for the linter too
            found = stage(f"{op} ({label})", lambda model=model, rt=rt, op=op: throughput(cfg, model, rt, x, y, s, op))
            if found is not None:
                report["throughput"].setdefault(label, {})[op] = found
        del model
    stage("bf16 agreement", lambda: report.update(agreement=agreement(
        cfg, fresh(runtimes["fp32"]), fresh(runtimes["bf16 + channels_last"]), runtimes["bf16 + channels_last"],
        x[:s.eval_batch_size], y[:s.eval_batch_size])))
    stage("JPEG decoding", lambda: report.update(decode=decode_rate(splits.train, s.steps + 2)))
    if dev.type == "cuda":
        stage("peak memory", lambda: report.update(memory=memory(cfg, fresh(profile_rt), profile_rt, x, y, s)))
    else:
        report["memory"] = None  # torch tracks device memory on CUDA only
    rates = report["throughput"].get(report["profile_runtime"], {})
    decode = report.get("decode", {}).get("images_per_s")
    if "train" in rates and decode:
        report["decode_bound"] = decode < rates["train"]["images_per_s"]
    report["projection"] = projection.project(PAPER, {k: v["images_per_s"] for k, v in rates.items()}, decode)
    report["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    report["complete"] = not report["skipped"]
    report["elapsed_s"] = time.perf_counter() - started
    write(out, report)
    if progress:
        print(markdown(report), flush=True)
    return report


def write(out: Path, report: dict[str, Any]) -> None:
    """``gpu-check.json`` and ``gpu-check.md`` in ``out``, replaced atomically."""
    for name, text in (("gpu-check.json", json.dumps(report, indent=1)), ("gpu-check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(r: dict[str, Any]) -> str:
    """The report as markdown tables (what the README's GPU section shows)."""
    env = r["environment"]
    lines = [f"### gpu-check on {env['device']} ({r['size']} sizes), {env['date_utc']} UTC",
             "", " ".join(f"{k} {v};" for k, v in env.items() if k not in ("device", "date_utc")),
             f"{'complete' if r['complete'] else 'PARTIAL: skipped ' + ', '.join(r['skipped'])}, "
             f"{r.get('elapsed_s', 0):.0f} s of a {r['budget_s']:g} s budget; profile runtime: {r['profile_runtime']}",
             ""]
    if r["throughput"]:
        lines += ["| images/s | " + " | ".join(r["throughput"]) + " |", "|---" * (1 + len(r["throughput"])) + "|"]
    for op in OPS if r["throughput"] else ():
        cells = [f"{r['throughput'][k][op]['images_per_s']:.1f}" if op in r["throughput"][k] else "skipped"
                 for k in r["throughput"]]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    if "agreement" in r:
        a = r["agreement"]
        lines += ["", f"bf16 against fp32 on {a['images']} images: accuracy {a['accuracy_bf16']:.4f} against "
                  f"{a['accuracy_fp32']:.4f} (difference {a['accuracy_difference']:+.4f}), predictions agree on "
                  f"{a['prediction_agreement']:.2%}, FGSM pixels agree on {a['fgsm_pixel_agreement']:.4%}."]
    if "decode" in r:
        d = r["decode"]
        bound = {True: "decode-bound", False: "not decode-bound", None: "not determined"}[r.get("decode_bound")]
        lines += ["", f"JPEG decoding with {d['workers']} workers: {d['images_per_s']:.1f} images/s "
                  f"(start-up {d['startup_s']:.1f} s); training is {bound}."]
    if r.get("memory"):
        m = r["memory"]
        lines += ["", "| heaviest step | peak GiB |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in m["peak_gib"].items()]
        lines += ["", f"Largest eval_batch_size that fits ({m['device_total_gib']:.0f} GiB): {m['eval_batch_size_fits']}"
                  f" ({'tried' if m['fit_verified'] else 'halved after an out-of-memory'})."]
    if "projection" in r:
        note = "" if r["size"] == "full" else (" Tiny sizes: these rates are a 32-pixel, narrow model's, so "
                                                "the projection below only shows the arithmetic.")
        lines += ["", f"Projection of the `paper` book from the {r['profile_runtime']} rates.{note}", "",
                  projection.markdown(r["projection"])]
    return "\n".join(lines) + "\n"
