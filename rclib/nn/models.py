"""Models (paper App. B): torchvision VGG16 and the same topology scaled to small inputs.

Both are wrapped in :class:`VGG`, whose first layer standardises pixels (``Normalize``), so that
inputs, attacks and clamping stay in [0, 1] pixel space. Module names follow torchvision
(``features``, ``avgpool``, ``classifier``), so a torchvision VGG16 state dict loads as it is and
the paper's prune targets (``model.features`` convolutions, ``model.classifier`` linears) are the
same attribute paths.

An architecture is described by a small JSON-able ``spec`` dict, so a saved model file can say
what to rebuild without pickling anything (see ``codec``).

Used by every chapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rclib.core.config import Config
from rclib.core.paths import resolve_path
from rclib.nn import specs

# VGG16's 13 convolutions in 5 blocks ("M" ends a block), as in torchvision's cfg "D".
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers are not persistent, so torchvision state dicts load."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class VGG(nn.Module):
    """normalize -> features -> avgpool -> flatten -> classifier; ``spec`` rebuilds it."""

    def __init__(self, normalize: Normalize, features: nn.Sequential, avgpool: nn.Module,
                 classifier: nn.Sequential, spec: dict[str, Any]):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        self.spec = dict(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _centre_tap(c_in: int, c_out: int) -> nn.Conv2d:
    """A 1x1 convolution holding the centre tap of a default-initialised 3x3 one.

    On a 1x1 map a padded 3x3 kernel only ever multiplies its centre tap with real input; the
    other 8 taps see zero padding, get no gradient and keep their initial values, yet global
    magnitude pruning counts them. A 1x1 kernel computes the same function without them.
    PyTorch's default init of a 1x1 kernel draws from a range 3x wider (fan_in C, not 9C), so
    those layers would end up with larger weights than a 3x3 layer trained the same way, and
    global magnitude pruning would then cut everywhere else first. Taking the centre tap keeps
    the 3x3 scale and consumes the same random numbers, so a seeded model starts as the 3x3
    model did (the same logits to float precision; training then drifts apart, since Adam
    amplifies the different summation order).

    Used by chapter 00 through ``build``.
    """
    conv3 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
    # built on "meta" so that it draws no random numbers; both parameters are replaced
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, device="meta")
    conv.weight = nn.Parameter(conv3.weight.detach()[:, :, 1:2, 1:2].clone())
    conv.bias = nn.Parameter(conv3.bias.detach().clone())
    return conv


def _small_features(in_channels: int, image_size: int, width: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for block in VGG16_BLOCKS:
        for c in block:
            c_out = max(1, c * width // 64)
            # an 8x8 input has room for only 3 of VGG16's 5 pools, so blocks 4-5 see 1x1 maps
            if size == 1:
                layers.append(_centre_tap(c_in, c_out))
            else:
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    return nn.Sequential(*layers)


def _classifier(n_in: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def spec(cfg: Config, num_classes: int, input_shape: tuple[int, int, int],
         mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The JSON-able description of the architecture ``cfg`` asks for."""
    return dict(model=cfg.model, width=cfg.width, hidden=cfg.hidden, batch_norm=cfg.batch_norm,
                dropout=cfg.dropout, num_classes=num_classes, input_shape=list(input_shape),
                mean=list(mean), std=list(std))


def _layer(entry: list) -> nn.Module:
    kind, *args = entry
    if kind == "conv":
        c_in, c_out, k, stride, pad = args
        return nn.Conv2d(c_in, c_out, kernel_size=k, stride=stride, padding=pad)
    if kind == "bn":
        return nn.BatchNorm2d(args[0])
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "maxpool":
        return nn.MaxPool2d(kernel_size=args[0], stride=args[1])
    if kind == "linear":
        return nn.Linear(args[0], args[1])
    if kind == "dropout":
        return nn.Dropout(args[0])
    if kind == "avgpool":
        return nn.AdaptiveAvgPool2d(tuple(args[0]))
    raise ValueError(f"unknown layer kind {kind!r} in a model description")


def _entry(m: nn.Module) -> list:
    if isinstance(m, nn.Conv2d):
        return ["conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]]
    if isinstance(m, nn.BatchNorm2d):
        return ["bn", m.num_features]
    if isinstance(m, nn.ReLU):
        return ["relu"]
    if isinstance(m, nn.MaxPool2d):
        k, st = m.kernel_size, m.stride
        return ["maxpool", k if isinstance(k, int) else k[0], st if isinstance(st, int) else st[0]]
    if isinstance(m, nn.Linear):
        return ["linear", m.in_features, m.out_features]
    if isinstance(m, nn.Dropout):
        return ["dropout", m.p]
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size
        return ["avgpool", [size, size] if isinstance(size, int) else list(size)]
    raise ValueError(f"cannot describe layer {type(m).__name__}")


def describe(model: VGG) -> dict[str, Any]:
    """A spec listing every layer explicitly (``layers``), for models whose widths no longer
    follow a formula, e.g. after ``prune.harden``. ``from_spec`` rebuilds it exactly."""
    s = {k: v for k, v in model.spec.items() if k != "layers"}
    s["layers"] = {
        "features": [_entry(m) for m in model.features],
        "avgpool": _entry(model.avgpool),
        "classifier": [_entry(m) for m in model.classifier],
    }
    return s


def _scaled_vgg16(norm: Normalize, s: dict[str, Any]) -> VGG:
    """torchvision's VGG16 with every width scaled: convolutions ``width / 64`` of VGG16's, the
    hidden linears ``hidden`` wide, the same 7x7 average pool and torchvision's own layers and
    initialisation (``torchvision.models.vgg.make_layers``). At width 64 and hidden 4096 ``from_spec`` takes
    torchvision's ``vgg16()`` itself; this is the size-reducing override that lets the paper's
    setting run end to end in a test on a CPU. Used by chapter 00 through ``build``."""
    from torchvision.models.vgg import cfgs, make_layers

    widths = [v if v == "M" else max(1, int(v) * s["width"] // 64) for v in cfgs["D"]]
    features = make_layers(widths, batch_norm=s["batch_norm"])
    if s["input_shape"][0] != 3:
        features[0] = nn.Conv2d(s["input_shape"][0], widths[0], kernel_size=3, padding=1)
    classifier = _classifier(widths[-2] * 7 * 7, s["hidden"], s["num_classes"], s["dropout"])
    for m in list(features.modules()) + list(classifier.modules()):  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return VGG(norm, features, nn.AdaptiveAvgPool2d((7, 7)), classifier, s)


def from_spec(s: dict[str, Any]) -> VGG:
    """Rebuild an (untrained) model from a ``spec`` dict. Used by ``build`` and ``codec``."""
    c, h, _ = s["input_shape"]
    norm = Normalize(tuple(s["mean"]), tuple(s["std"]))
    if "layers" in s:
        lay = s["layers"]
        return VGG(norm, nn.Sequential(*map(_layer, lay["features"])), _layer(lay["avgpool"]),
                   nn.Sequential(*map(_layer, lay["classifier"])), s)
    if s["model"] == "vgg16" and (s["width"], s["hidden"]) != (64, 4096):
        return _scaled_vgg16(norm, s)
    if s["model"] == "vgg16":
        import torchvision

        tv = torchvision.models.vgg16_bn() if s["batch_norm"] else torchvision.models.vgg16()
        if c != 3:
            tv.features[0] = nn.Conv2d(c, 64, kernel_size=3, padding=1)
        tv.classifier[2].p = tv.classifier[5].p = s["dropout"]
        if s["num_classes"] != 1000:
            tv.classifier[6] = nn.Linear(4096, s["num_classes"])
        return VGG(norm, tv.features, tv.avgpool, tv.classifier, s)
    if s["model"] == "vgg_small":
        features = _small_features(c, h, s["width"], s["batch_norm"])
        n_out = max(1, VGG16_BLOCKS[-1][-1] * s["width"] // 64)
        return VGG(norm, features, nn.AdaptiveAvgPool2d(1),
                   _classifier(n_out, s["hidden"], s["num_classes"], s["dropout"]), s)
    raise ValueError(f"model={s['model']!r} is not known; one of vgg_small, vgg16")


def from_state(s: dict[str, Any], state: dict[str, torch.Tensor], device: Any = "cpu") -> VGG:
    """The model of spec ``s`` holding exactly ``state`` (strict), on ``device``, in eval mode.

    Built on the ``meta`` device and given uninitialised memory on ``device`` before the state
    is copied in: no random initialisation (seconds on VGG16, and draws that would move torch's
    global RNG), and no CPU copy when ``device`` is a GPU. The non-persistent normalisation
    buffers come from the spec. Used by ``experiments`` to rebuild variants kept on the host
    (chapters 01 and 03).
    """
    with torch.device("meta"):
        model = from_spec(s)
    model = model.to_empty(device=device)
    model.normalize = Normalize(tuple(s["mean"]), tuple(s["std"])).to(device)
    model.load_state_dict(state, strict=True)
    return model.eval()


def build(cfg: Config, num_classes: int, input_shape: tuple[int, int, int],
          mean: tuple[float, ...], std: tuple[float, ...], pretrained: bool = True) -> VGG:
    """Build the model ``cfg`` names, seeded, with the weights it asks for, on CPU.

    Pretrained weights (``imagenet`` or a file) fill every tensor, strictly, except a classifier
    head whose shape does not fit the data's class count (ImageNet's 1000 classes on a 10-class
    folder): that head keeps its seeded initialisation, a warning names the source and both
    shapes, and :func:`head_is_new` says so, so that ``steps.baseline`` fits it
    (``cfg.head_epochs``) before any other training.

    Args:
        cfg: uses ``model`` (``vgg_small`` | ``vgg16``), ``width`` (first block's channels; VGG16
            has 64), ``hidden`` (hidden linear width; VGG16 has 4096), ``batch_norm``, ``dropout``,
            ``weights`` (``none`` | ``imagenet`` through torchvision | a local ``.safetensors``
            state dict) and ``seed`` (initialisation).
        num_classes, input_shape, mean, std: from ``datasets.load(cfg)`` (``Splits``).
        pretrained: False skips ``cfg.weights`` (the same seeded initialisation), for a caller
            that loads a full state dict right away (a cached baseline or variant): reading
            VGG16's 0.5 GB of pretrained weights only to overwrite them would be waste.

    Returns:
        A :class:`VGG` mapping (B, C, H, W) pixels in [0, 1] to (B, num_classes) logits.

    Example:
        >>> s = datasets.load(cfg)
        >>> model = build(cfg, s.num_classes, s.input_shape, s.mean, s.std)

    Used by chapter 00 (baseline) and every later chapter through ``steps.baseline``.
    """
    torch.manual_seed(cfg.seed)
    model = from_spec(spec(cfg, num_classes, input_shape, mean, std))
    if not pretrained or cfg.weights == "none":
        return model
    state, source = _pretrained_state(cfg)
    head = head_name(model)
    own = model.state_dict()
    misfit = [k for k in (f"{head}.weight", f"{head}.bias")
              if k in state and k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if misfit:
        import warnings

        warnings.warn(f"weights={cfg.weights!r}: {source}'s head {head}.weight has shape "
                      f"{tuple(state[f'{head}.weight'].shape)}, the model's {tuple(own[f'{head}.weight'].shape)} "
                      f"({num_classes} classes); the head keeps its seeded initialisation and is fitted "
                      f"alone for head_epochs={cfg.head_epochs} epochs before training", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in misfit}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = sorted(set(missing) - set(misfit)) + sorted(unexpected)
    if wrong:  # checks.check_weights refuses such files up front; this guards any other caller
        raise RuntimeError(f"weights={cfg.weights!r}: {source} does not fit the model "
                           f"(missing or unexpected: {', '.join(wrong[:6])})")
    return model


def _pretrained_state(cfg: Config) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict ``cfg.weights`` names and a few words saying where it came from."""
    if cfg.weights == "imagenet":
        import torchvision

        w = (torchvision.models.VGG16_BN_Weights if cfg.batch_norm else torchvision.models.VGG16_Weights).IMAGENET1K_V1
        tv = (torchvision.models.vgg16_bn if cfg.batch_norm else torchvision.models.vgg16)(weights=w)
        return tv.state_dict(), f"torchvision's {w}"
    from safetensors.torch import load_file

    path = resolve_path(cfg.weights)
    return load_file(str(path)), str(path)


def head_name(model: nn.Module) -> str:
    """The qualified name of the classifier head, the last linear layer of ``model.classifier``
    (``"classifier.6"`` for VGG16 and the small net). Used by :func:`build`, ``checks`` and
    ``steps.fit_head`` (chapter 00)."""
    return [n for n, m in prunable_layers(model) if isinstance(m, nn.Linear)][-1]


IMAGENET_HEAD = (1000, 4096)  # torchvision VGG16's classifier.6.weight


def head_is_new(cfg: Config, model: nn.Module) -> bool:
    """Whether :func:`build` left ``model``'s head at its initialisation because ``cfg.weights``
    holds a head of another shape (read from the file's header or torchvision's known shape;
    no weights are loaded). Used by ``steps.baseline`` (chapter 00) to fit that head first."""
    if cfg.weights == "none":
        return False
    name = f"{head_name(model)}.weight"
    want = tuple(dict(model.named_parameters())[name].shape)
    if cfg.weights == "imagenet":
        return want != IMAGENET_HEAD
    from safetensors import safe_open

    with safe_open(str(resolve_path(cfg.weights)), framework="pt") as f:
        return name in f.keys() and tuple(f.get_slice(name).get_shape()) != want


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """L_prune(h): the convolutions of ``model.features`` and linears of ``model.classifier``.

    This is Table 2's ``prune_targets``. A model without those attributes contributes all of
    its Conv2d and Linear modules, so the pruning functions work on any network.

    Returns:
        ``[(qualified_name, module), ...]`` in forward order.

    Used by ``prune``, ``share``, ``sizes``, ``codec`` and chapters 00-04.
    """
    kinds = (nn.Conv2d, nn.Linear)
    if hasattr(model, "features") and hasattr(model, "classifier"):
        return [(f"{part}.{n}", m) for part in ("features", "classifier")
                for n, m in getattr(model, part).named_modules() if isinstance(m, kinds)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def summary(model: nn.Module):
    """Per-layer table: name, type, weight shape, parameter count (weights + bias)."""
    import pandas as pd

    rows = []
    for name, m in prunable_layers(model):
        n = sum(p.numel() for p in m.parameters())
        rows.append(dict(layer=name, type=type(m).__name__, weight_shape=tuple(m.weight.shape), parameters=n))
    return pd.DataFrame(rows)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def skeleton(spec: dict[str, Any]) -> VGG:
    """The architecture ``spec`` records, on the ``meta`` device: shapes without memory, so a
    spec of any size costs nothing until it has been checked (a compressed file's header).

    Raises:
        specs.BadSpec: the spec is not one :func:`from_spec` can build into a working classifier
            (judged field by field: a spec carries no tensors a checksum could cross-check).
        ValueError: building it failed anyway (the reason named).

    Used by ``compress.codec.load_compressed`` (chapters 02 and 04).
    """
    specs.check(spec)
    try:
        with torch.device("meta"):
            return from_spec(spec)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, MemoryError, RecursionError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None


def materialise(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Real (uninitialised) memory for a :func:`skeleton`: every persistent tensor is then filled
    by the caller, so the random initialisation is skipped (seconds on VGG16); the non-persistent
    normalisation buffers are rebuilt from the spec. Used by ``compress.codec``."""
    model = model.to_empty(device="cpu")
    if isinstance(model, VGG):
        model.normalize = Normalize(tuple(spec["mean"]), tuple(spec["std"]))
    return model
