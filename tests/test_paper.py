"""The paper's setting end to end: every chapter and page under ``--profile paper`` on a fake
ILSVRC-style folder, on CPU, with size-reducing overrides only (no profile is patched).

What keeps it small (``toys.PAPER_SMALL``): a 32x32 crop of 10 classes x 12 images,
torchvision's VGG16 scaled by ``width``/``hidden`` (the same layers and code path as the real
one), two seeds, two prune rates and small maps and attack samples. What stays the paper's: the
dataset kind and its stratified 80/20 split, ``model="vgg16"`` without BatchNorm, pretrained
weights (a local file whose 1000-class head does not fit the folder's 10 classes, so the head is
replaced and fitted for ``head_epochs``), ``epochs=0``, SGD retraining, eps 0.03 and the paper's
epsilons. The build itself runs in the background from the start of the session (conftest).
"""

from __future__ import annotations

import resource

from rclib import book

GIB = 1024 ** 3


def test_every_chapter_runs_under_the_paper_profile_within_6_gib(paper_book):
    # the largest resident set among the processes this session waited for: the build's kernels
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < 6 * GIB, f"a process peaked at {peak / GIB:.1f} GiB"
    src = paper_book / "_build" / "src"
    chapters = sorted((src / "notebooks").glob("*.ipynb"))
    assert [nb.stem[:2] for nb in chapters] == ["00", "01", "02", "03", "04", "05"]
    for nb in chapters:
        values = book.glued(nb)
        cfg = values["config"]
        assert (cfg["profile"], cfg["model"], cfg["dataset"], cfg["epochs"], cfg["epsilon"]) == \
            ("paper", "vgg16", "imagenet", 0, 0.03), nb.stem
        assert values["claims"], nb.stem
    assert book.glued(src / "book" / "claims.ipynb")["n_claims"] > 0
    # the paper's eps 0.03 is also a point of its curve, so two claim rows of chapter 00 read alike
    # (a Styler indexed by the quantity refused to render them)
    values = book.glued(src / "notebooks" / "00_baseline.ipynb")
    assert values["epsilon"] == 0.03 and values["robust_acc"] == values["robust_acc_003"]
