"""Tiny models shared by the unit tests (as Torch-Pruning keeps its toy nets in one place)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rclib.nn.models import from_spec

# The overrides the shared smoke build of the whole book runs with (conftest.smoke_book): every
# chapter must receive them, and tests that rerun a chapter reuse them to compare with that build.
# `seed` (the single-model figures) is one of `seeds`: otherwise every chapter would train and
# measure a third seed's models only for its figures (about 20 CPU-seconds of make test)
SMOKE_BOOK_PARAMS = {"seed": 3, "width": 4, "seeds": "[0, 3]"}

# A VGG16-topology net for 1x8x8 inputs and 10 classes, small enough to train in a second.
SPEC = dict(model="vgg_small", width=8, hidden=32, batch_norm=True, dropout=0.0, num_classes=10,
            input_shape=[1, 8, 8], mean=[0.5], std=[0.5])


def tiny_vgg(seed: int = 0, **changes) -> nn.Module:
    """``SPEC`` built with ``seed`` (fields overridden by ``changes``)."""
    torch.manual_seed(seed)
    return from_spec({**SPEC, **changes})


def image_folder(root: Path, classes, per_class: int, size=(40, 30)) -> Path:
    """An ImageFolder of solid-colour RGB PNGs: class c has red level 60*c + 20, so the label is
    visible; image i of a class has green level 10*i."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        (root / name).mkdir()
        for i in range(per_class):
            Image.new("RGB", size, (60 * c + 20, 10 * i, 128)).save(root / name / f"img{i}.png")
    return root


# WordNet ids of ILSVRC2012 classes, as an ImageNet validation folder names its sub-folders
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
         "n01514668", "n01514859", "n01518878")


def ilsvrc_folder(root: Path, classes: int = 10, per_class: int = 12, size=(48, 40)) -> Path:
    """A fake ILSVRC2012-validation folder: ``classes`` WordNet-id sub-folders of ``per_class``
    JPEGs each, the image modes a real crawl holds mixed in (most RGB; some grayscale "L",
    CMYK, RGBA PNG and palette "P"), and sizes that vary, so the resize/crop path is real."""
    from PIL import Image

    modes = ("RGB", "L", "RGB", "CMYK", "RGB", "RGBA", "RGB", "P")
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for c, wnid in enumerate(WNIDS[:classes]):
        (root / wnid).mkdir()
        for i in range(per_class):
            mode = modes[(c + i) % len(modes)]
            w, h = size[0] + 4 * (i % 3), size[1] + 3 * (c % 2)
            noise = torch.randint(0, 40, (h, w, 3), generator=g, dtype=torch.uint8)
            rgb = (noise + torch.tensor([20 * c, 100, 200 - 15 * c], dtype=torch.uint8)).numpy()
            img = Image.fromarray(rgb, "RGB")
            img = img.convert(mode) if mode != "P" else img.quantize(16)
            suffix = "png" if mode in ("RGBA", "P") else "JPEG"
            img.save(root / wnid / f"ILSVRC2012_val_{c * per_class + i + 1:08d}.{suffix}")
    return root


ODD_MODES = ("L", "1", "LA", "P", "RGBA", "CMYK", "I;16")  # what real folders hold besides RGB


def odd_mode_folder(root: Path, size=(20, 14)) -> Path:
    """An ImageFolder with one image per mode of ``ODD_MODES`` in each of two classes (CMYK as
    JPEG, the way ImageNet's few CMYK images come; the rest as PNG); every image is a gradient,
    so a wrong channel order or scale shows."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    ramp = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 255 // (size[0] * size[1] - 1))
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], -1).astype(np.uint8))
    for name in ("a", "b"):
        (root / name).mkdir()
        for i, mode in enumerate(ODD_MODES):
            if mode == "I;16":
                img = Image.fromarray((ramp * 257).astype(np.uint16))  # 16-bit grayscale
            elif mode == "P":
                img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
            else:
                img = rgb.convert(mode)
            ext = "jpg" if mode == "CMYK" else "png"
            img.save(root / name / f"{i}_{mode.replace(';', '_')}.{ext}")
    return root
# The paper profile's overrides for the end-to-end test (conftest.paper_book): data size, model
# widths, one seed (the smoke build runs several), repetitions, grids and samples, and head_epochs 0. That last one leaves the replaced head
# untrained (epochs is 0 under paper), so no model beats chance and every chapter also meets that
# case (claims without values must say so, not crash); fitting the head is tested on its own.
PAPER_SMALL = dict(image_size=32, width=4, hidden=32, seeds="[0]", prune_rates="[0.5, 0.9]",
                   map_rates="[0.5]", resolution=20, local_examples=4, local_resolution=11, attack_sample=8,
                   size_model="small", num_workers=0, latency_batch=8, latency_repeats=3, head_epochs=0,
                   prune_step=0.3, apgd_steps=5, apgd_targets=1, square_queries=10)


def paper_weights(folder: Path) -> Path:
    """A local ``.safetensors`` state dict of the scaled VGG16 of ``PAPER_SMALL`` with a 1000-class
    head, as a converted torchvision ImageNet checkpoint has: it does not fit a 10-class folder,
    so the model keeps its trunk and replaces and fits the head (``head_epochs``)."""
    from safetensors.torch import save_file

    spec = dict(model="vgg16", width=PAPER_SMALL["width"], hidden=PAPER_SMALL["hidden"], batch_norm=False,
                dropout=0.5, num_classes=1000, input_shape=[3, PAPER_SMALL["image_size"], PAPER_SMALL["image_size"]],
                mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    torch.manual_seed(0)
    path = folder / "vgg16-imagenet-head.safetensors"
    save_file(from_spec(spec).state_dict(), str(path))
    return path


class LiveModels:
    """Counts the ``rclib.nn.models.VGG`` objects created after ``start(monkeypatch)`` that are still
    alive: how the memory tests check that at most one variant exists beside the baseline.
    Weak references, not a scan of every object (``gc.get_objects`` takes seconds in a long test
    session); a collection runs only when the count looks too high, to drop cycles."""

    def start(self, monkeypatch) -> "LiveModels":
        import weakref

        from rclib.nn import models

        self.alive = weakref.WeakSet()
        init, setstate = models.VGG.__init__, models.VGG.__setstate__

        def built(module, *args, **kwargs):
            init(module, *args, **kwargs)
            self.alive.add(module)

        def copied(module, state):  # copy.deepcopy (prune.clone) restores state without __init__
            setstate(module, state)
            self.alive.add(module)

        monkeypatch.setattr(models.VGG, "__init__", built)
        monkeypatch.setattr(models.VGG, "__setstate__", copied)
        return self

    def count(self, limit: int) -> int:
        if len(self.alive) > limit:
            import gc

            gc.collect()
        return len(self.alive)
