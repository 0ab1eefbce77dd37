"""Results over seeds and across chapters: pipeline.over_seeds, plots.seed_stats, book.claim /
book.gather (the claims page's source), and the runner's execution order."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook, new_output

from rclib import book, config, pipeline, plots
from rclib.__main__ import execution_order

import toys


def test_gathering_pages_run_after_the_chapters():
    toc = [Path("book/claims.ipynb"), Path("notebooks/00_baseline.ipynb"), Path("book/intro.ipynb"),
           Path("notebooks/01_pruning.ipynb")]
    assert execution_order(toc) == [toc[1], toc[3], toc[0], toc[2]]


def test_claim_rows_read_back_from_a_glued_notebook(tmp_path):
    rows = [book.claim("Sec. 3.1 · chapter 01", "structured pruning drops faster", "yes", "12.0 ± 3.1",
                       "holds (3 of 3 seeds)"),
            book.claim("Sec. 3.2 · chapter 02", "weight sharing cost (pp)", 1.5, float("nan"), "inconclusive")]
    assert rows[1]["ours"] is None  # nan would not read back from the glued text
    # a chapter as papermill + myst_nb.glue leave it: the value's repr under a scrapbook name
    out = new_output("display_data", data={"application/papermill.record/text/plain": repr(rows)},
                     metadata={"scrapbook": {"name": "claims", "mime_prefix": "application/papermill.record/"}})
    nb = new_notebook(cells=[new_code_cell("glue('claims', rows)", outputs=[out])])
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "01_pruning.ipynb")
    table = book.gather(["notebooks/01_pruning.ipynb"], src=tmp_path)
    assert list(table.quantity) == [r["quantity"] for r in rows]
    assert table.chapter.unique().tolist() == ["notebooks/01_pruning.ipynb"]
    with pytest.raises(FileNotFoundError, match="02_weight_sharing"):
        book.gather(["notebooks/01_pruning.ipynb", "notebooks/02_weight_sharing.ipynb"], src=tmp_path)


def test_seed_stats_mean_and_sample_std_per_rate():
    rows = [dict(rate=0.5, acc=a) for a in (0.8, 0.9, 1.0)] + [dict(rate=0.9, acc=0.2)]
    rates, mean, std, n = plots.seed_stats(rows, "acc", scale=100)
    assert rates.tolist() == [0.5, 0.9] and n.tolist() == [3, 1]
    np.testing.assert_allclose(mean, [90.0, 20.0])
    np.testing.assert_allclose(std, [10.0, 0.0])


def test_over_seeds_runs_each_seed_on_its_own_cached_baseline():
    cfg = config.load("smoke", train_size=64, test_size=32, epochs=1, seeds=(0, 1))
    seen = []

    def step(cfg_s, splits_s, base_s):
        seen.append((cfg_s.seed, next(base_s.parameters()).sum().item()))
        return [dict(value=cfg_s.seed * 10)]

    rows = pipeline.over_seeds(cfg, step, progress=False)
    assert rows == [dict(value=0, seed=0), dict(value=10, seed=1)]
    assert seen[0][0] == 0 and seen[1][0] == 1 and not math.isclose(seen[0][1], seen[1][1])
    again = pipeline.over_seeds(cfg, step, progress=False)  # baselines now come from the cache
    assert again == rows and seen[2:] == seen[:2]


def test_over_seeds_parks_the_callers_models_and_gives_them_back(monkeypatch):
    """Models in ``park`` leave their device for the host during the loop and come back after,
    also when a step fails; models already on the host are not touched. No GPU here: the parked
    model's device is faked and ``prune.move`` is recorded."""
    cfg = config.load("smoke", train_size=64, test_size=32, epochs=1, seeds=(0, 1))
    held, on_cpu = toys.tiny_vgg(), toys.tiny_vgg()
    moves = []
    monkeypatch.setattr(pipeline.prune, "move", lambda m, d: moves.append((m, str(d))))
    device = pipeline.train.model_device
    monkeypatch.setattr(pipeline.train, "model_device", lambda m: torch.device("cuda", 0) if m is held else device(m))

    def step(cfg_s, splits_s, base_s):
        assert moves == [(held, "cpu")]  # on the host while the seeds run
        return [dict(value=1)]

    assert len(pipeline.over_seeds(cfg, step, progress=False, park=[held, on_cpu])) == 2
    assert moves == [(held, "cpu"), (held, "cuda:0")]
    moves.clear()

    def failing(cfg_s, splits_s, base_s):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        pipeline.over_seeds(cfg, failing, progress=False, park=[held])
    assert moves == [(held, "cpu"), (held, "cuda:0")]


def test_comparison_styles_claims_whose_quantities_coincide():
    # chapter 00 under the paper profile: the headline epsilon is the paper's 0.03, so two rows
    # may read alike; a Styler on a repeated index raised "Styler.apply and .map are not compatible
    # with non-unique index or columns" when the table was rendered
    rows = [book.claim("Table 1 · chapter 00", "FGSM robust accuracy (%) at eps 0.03", 23.5, "12.0 ± 1.0", "holds"),
            book.claim("Table 1 · chapter 00", "FGSM robust accuracy (%) at eps 0.03", None, "12.0 ± 1.0",
                       "not compared")]
    html = book.comparison(rows).to_html()
    assert html.count("FGSM robust accuracy (%) at eps 0.03") == 2 and "—" in html
