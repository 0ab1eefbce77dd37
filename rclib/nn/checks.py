"""Can this model be trained here? Training at all, memory against this machine, and a weights
file's header against the model, judged before any work.

The model is built on PyTorch's ``meta`` device (shapes only, nothing allocated), so the checks
run in well under a second. Each raises ``ValueError`` naming the parameter, the value and what
is allowed.

Used by ``rclib.experiments.setup.feasible`` (every chapter's first cell, ``python -m rclib``).
"""

from __future__ import annotations

import os
from pathlib import Path

from rclib.core.config import Config, refuse
from rclib.core.paths import resolve_path
from rclib.data import checks as data_checks
from rclib.data.checks import DataShape
from rclib.nn import models


def check_training(cfg: Config, shape: DataShape) -> None:
    """Training must be able to run: some training at all, and no BatchNorm batch of one.

    * ``epochs`` 0 with ``weights='none'`` trains nothing: every chapter would report verdicts
      on a randomly initialised model at chance. A weights file (the paper profile) is a model.
    * With ``batch_norm``, ``batch_size`` 1 makes every training batch a single image, which
      BatchNorm cannot normalise ("Expected more than 1 value per channel"), mid-training. A
      training set whose LAST batch would hold one image (``train_size`` 513, ``batch_size`` 64)
      is not refused: ``datasets.load`` drops that one image per epoch (a different one each epoch,
      as the order is shuffled); every other configuration keeps all its batches and numbers.
    """
    if cfg.epochs == 0 and cfg.weights == "none":
        raise ValueError(f"epochs={cfg.epochs!r} with weights={cfg.weights!r} is not allowed: it trains "
                         "nothing, and every page would report on an untrained model at chance; give "
                         "epochs >= 1, or a weights file to start from")
    if cfg.batch_norm and cfg.batch_size == 1:
        raise ValueError(f"batch_size={cfg.batch_size!r} is not allowed with batch_norm=True: every training "
                         "batch would be one image, which BatchNorm cannot normalise; use batch_size >= 2, "
                         "or batch_norm=False")


def _meta_model(cfg: Config, shape: DataShape):
    import torch

    c = shape.input_shape[0]
    with torch.device("meta"):
        return models.from_spec(models.spec(cfg, shape.num_classes, shape.input_shape, (0.0,) * c, (1.0,) * c))


def layer_outputs(model, input_shape: tuple[int, int, int]) -> int:
    """Elements of every convolution's and linear layer's output for one example of a VGG (the
    activations a backward pass keeps), walking ``features``, ``avgpool`` and ``classifier``."""
    from torch import nn

    c, h, w = input_shape
    total = 0

    def out(size: int, k: int, s: int, p: int) -> int:
        return (size + 2 * p - k) // s + 1

    def pair(v) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else tuple(v)

    for m in list(model.features) + [model.avgpool]:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            (kh, kw), (sh, sw), (ph, pw) = pair(m.kernel_size), pair(m.stride), pair(m.padding)
            h, w = out(h, kh, sh, ph), out(w, kw, sw, pw)
            if h < 1 or w < 1:
                raise ValueError(f"{type(m).__name__} leaves a {h}x{w} map")
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
                total += c * h * w
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            h, w = pair(m.output_size)
        elif not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity)):
            raise ValueError(f"cannot size a {type(m).__name__} layer")
    total += sum(m.out_features for m in model.classifier if isinstance(m, nn.Linear))
    return total


def memory_needed(cfg: Config, shape: DataShape) -> dict[str, float]:
    """Bytes the run needs at the very least, by what needs them (a lower bound, so only the
    obviously impossible is refused).

    * ``training``: 4 bytes x (4 x parameters + outputs of every convolution and linear layer
      for one ``batch_size`` batch): weights, gradients and two Adam moments, and the
      activations the backward pass keeps.
    * ``evaluation``: 4 bytes x (parameters + those outputs for one ``eval_batch_size`` batch),
      what an attack's input gradient keeps.
    * ``decision map``: ``resolution``^2 grid points, each with two plane coordinates, a class, a
      confidence and an RGB colour (8 bytes each).

    Counted from the layers' shapes alone (the model is built on the ``meta`` device, and the
    output size of every layer follows from its kernel, stride and padding), so even an absurd
    width costs nothing. A forward pass on ``meta`` would give the same counts but imports
    torch's meta kernels first, about 1.5 s at the start of every chapter.
    """
    model = _meta_model(cfg, shape)
    params = sum(p.numel() for p in model.parameters())
    try:
        acts = layer_outputs(model, shape.input_shape)
    except ValueError as err:  # e.g. five max-pools on an 8x8 input leave nothing
        refuse("image_size", cfg.image_size, f"an input size model={cfg.model!r} can take ({err})")
    # activations are per example: one forward pass of shapes, scaled by each batch size
    return {"training": 4.0 * (4 * params + acts * cfg.batch_size),
            "evaluation": 4.0 * (params + acts * cfg.eval_batch_size),
            "decision map": 8.0 * 8 * cfg.resolution ** 2}


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, shape: DataShape, defaults: Config | None = None) -> None:
    """Refuse a configuration whose memory is obviously beyond the machine, naming the
    parameters that drive it (those changed from ``defaults``, the profile, first)."""
    total = machine_memory()
    drivers = {"training": ("width", "hidden", "image_size", "batch_size", "model"),
               "evaluation": ("width", "hidden", "image_size", "eval_batch_size", "model"),
               "decision map": ("resolution",)}
    for what, need in memory_needed(cfg, shape).items():
        if need <= total:
            continue
        names = drivers[what]
        if defaults is not None:
            changed = [n for n in names if getattr(cfg, n) != getattr(defaults, n)]
            names = tuple(changed) or names
        values = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names)
        raise ValueError(f"{values} is not allowed: the {what} would need about {need / 1e9:,.1f} GB, more than "
                         f"this machine's {total / 2**30:.0f} GiB of memory; choose smaller values")


def check_weights(cfg: Config, shape: DataShape) -> None:
    """A ``weights`` file must be a readable safetensors file whose tensors fit the model:
    the header is parsed (nothing else is read) and names and shapes are compared. Only the
    classifier head may differ in shape (a 1000-class head on a 10-class folder): ``models.build``
    leaves it out and ``steps.baseline`` fits a new one."""
    if cfg.weights == "imagenet":
        check_pretrained(cfg)
        return
    if cfg.weights == "none":
        return
    from safetensors import safe_open

    path = resolve_path(cfg.weights)
    if path.suffix != ".safetensors" or not path.is_file():
        refuse("weights", cfg.weights, "'none', 'imagenet', or an existing .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as err:  # garbage, an empty file, a renamed pickle: the header does not parse
        refuse("weights", cfg.weights, f"a readable safetensors file; its header does not parse ({err})")
    meta = _meta_model(cfg, shape)
    wanted = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    head = models.head_name(meta)
    diff = sorted(set(found) ^ set(wanted)) + sorted(k for k in set(found) & set(wanted) if found[k] != wanted[k]
                                                     and not k.startswith(f"{head}."))
    if diff:
        shown = "; ".join(f"{k}: file {found.get(k, 'absent')}, model {wanted.get(k, 'absent')}" for k in diff[:4])
        refuse("weights", cfg.weights, f"a state dict of the configured model (model={cfg.model!r}, "
              f"width={cfg.width}, hidden={cfg.hidden}, {shape.num_classes} classes); {len(diff)} tensors "
              f"differ: {shown}{' ...' if len(diff) > 4 else ''}")
    want_dtype = {k: SAFETENSORS_DTYPES.get(str(v.dtype), str(v.dtype)) for k, v in meta.state_dict().items()}
    wrong = sorted(k for k in found if dtypes[k] != want_dtype[k])
    if wrong:  # int8 or bool weights of the right shape would load by silent conversion
        shown = "; ".join(f"{k}: file {dtypes[k]}, model {want_dtype[k]}" for k in wrong[:4])
        refuse("weights", cfg.weights, f"a state dict with the model's dtypes; {len(wrong)} tensors differ: "
              f"{shown}{' ...' if len(wrong) > 4 else ''}")
    bad = nonfinite_tensor(path)
    if bad:
        refuse("weights", cfg.weights, f"a file of finite weights; tensor {bad!r} holds NaN or infinite values "
              "(a diverged training run?)")


# torch dtype (as str) -> the name a safetensors header uses
SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.float64": "F64", "torch.float16": "F16",
                      "torch.bfloat16": "BF16", "torch.int64": "I64", "torch.int32": "I32",
                      "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL"}
_FINITE: dict[tuple, str | None] = {}


def nonfinite_tensor(path: Path) -> str | None:
    """The name of the first floating-point tensor of a safetensors file holding NaN or an
    infinity, else None. Tensors are read one at a time (memory of the largest one), and the
    answer is remembered per (path, size, mtime, inode) for the life of the process."""
    import torch
    from safetensors import safe_open

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key not in _FINITE:
        _FINITE[key] = None
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    _FINITE[key] = k
                    break
    return _FINITE[key]


def imagenet_checkpoint(cfg: Config) -> tuple[Path, str]:
    """Where ``torch.hub`` keeps torchvision's ImageNet VGG16 weights for ``cfg`` (with or
    without BatchNorm), and the address it downloads them from."""
    import torch
    import torchvision

    w = (torchvision.models.VGG16_BN_Weights if cfg.batch_norm else torchvision.models.VGG16_Weights).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url), w.url


def check_pretrained(cfg: Config) -> None:
    """``weights='imagenet'`` needs torchvision's file in the torch.hub cache, or a network that
    answers within ``PROBE_TIMEOUT`` seconds (a HEAD request: nothing is downloaded here).
    Without either, torch.hub would fail mid-chapter after the data has loaded, with a long
    traceback and no timeout; refuse up front and name the local-file alternative."""
    path, url = imagenet_checkpoint(cfg)
    if path.is_file():
        return
    reason = data_checks.reachable(url)
    if reason is None:
        return
    stem = path.stem.split("-")[0]
    refuse("weights", cfg.weights, f"torchvision's ImageNet weights are not in the torch.hub cache ({path}) and "
          f"cannot be downloaded from {url} ({reason}); copy that file to {path}, or pass "
          f"weights=path/to/{stem}.safetensors, made once from it with: python -c \"import torch; "
          f"from safetensors.torch import save_file; save_file(torch.load('{path.name}', weights_only=True), "
          f"'{stem}.safetensors')\"")


