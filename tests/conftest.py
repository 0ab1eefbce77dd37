"""Shared fixtures for the unit tests: one thread, a private artifact cache, tiny configs/models.

``OMP_WAIT_POLICY=PASSIVE`` must be in the environment before torch starts its thread pool
(spinning OpenMP threads starve other processes on small machines), so it is set here at
import time, before anything imports torch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from rclib import config, models  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_artifacts(tmp_path, monkeypatch):
    """Every test caches into its own temporary folder, never into data/artifacts."""
    monkeypatch.setenv("RCLIB_ARTIFACTS", str(tmp_path / "artifacts"))


@pytest.fixture
def tiny_cfg():
    """The smoke profile cut down further: 128 train / 64 test digits, one epoch."""
    return config.load("smoke", train_size=128, test_size=64, epochs=1)


@pytest.fixture
def tiny_model():
    """A very small VGG16-topology net for 1x8x8 inputs and 10 classes (width 8, hidden 32)."""
    cfg = config.load("smoke", width=8, hidden=32)
    return models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,))


from toys import SMOKE_BOOK_PARAMS  # noqa: E402

SMOKE_OVERRIDES = tuple(a for name, value in SMOKE_BOOK_PARAMS.items() for a in ("-p", name, str(value)))


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The whole book built once per test session, as `make book` does, under the smoke profile
    with two overrides that every chapter must receive: ``python -m rclib book --profile smoke
    -p seed 3 -p width 4`` into a temporary folder, with its own artifacts.

    Returns the output folder: executed chapters in ``_build/src``, HTML in ``_build/html``.
    The chapter and book tests all read this one build instead of executing again.
    """
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("book")
    env = {**os.environ, "RCLIB_ARTIFACTS": str(out / "artifacts")}
    proc = subprocess.run([sys.executable, "-m", "rclib", "book", "--profile", "smoke", *SMOKE_OVERRIDES,
                           "--quiet", "--out", str(out), "--timeout", "600"],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def trained_toy():
    """A tiny VGG trained for a few seconds on 256 digits (about 50% test accuracy), with its
    splits; shared by the attack tests (training it once keeps them fast)."""
    from rclib import data, train

    s = data.load(config.load("smoke", train_size=256, test_size=64, batch_size=32))
    cfg = config.load("smoke", width=8, hidden=32, dropout=0.0)
    model = models.build(cfg, 10, s.input_shape, s.mean, s.std)
    train.fit(model, s.train, epochs=10, lr=3e-3, progress=False)
    model.zero_grad(set_to_none=True)  # fit leaves the last step's gradients behind
    return model, s
