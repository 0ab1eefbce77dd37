"""Results over seeds and across chapters: steps.over_seeds, stats.seed_stats, book.claim /
book.gather (the claims page's source), and the runner's execution order."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import toys
from nbformat.v4 import new_code_cell, new_notebook, new_output

from rclib.core import config, stats
from rclib.experiments import steps
from rclib.report import book
from rclib.report.runner import execution_order


def test_gathering_pages_run_after_the_chapters():
    toc = [Path("book/claims.ipynb"), Path("notebooks/00_baseline.ipynb"), Path("book/intro.ipynb"),
           Path("notebooks/01_pruning.ipynb")]
    assert execution_order(toc) == [toc[1], toc[3], toc[0], toc[2]]


def test_claim_rows_read_back_from_a_glued_notebook(tmp_path):
    where = dict(setting="r = 0.5", refuted_by="a drop at or below 0", anchor="ch01-sweep")
    rows = [book.claim("Sec. 3.1 · chapter 01", "structured pruning drops faster", "yes", "12.0 ± 3.1",
                       "holds (3 of 3 seeds)", measures="clean accuracy", **where),
            book.claim("Sec. 3.2 · chapter 01", "weight sharing cost (pp)", 1.5, float("nan"), "inconclusive",
                       measures="clean accuracy", **where)]
    assert rows[1]["ours"] is None  # nan would not read back from the glued text
    # a chapter as papermill + myst_nb.glue leave it: the value's repr under a scrapbook name
    out = new_output("display_data", data={"application/papermill.record/text/plain": repr(rows)},
                     metadata={"scrapbook": {"name": "claims", "mime_prefix": "application/papermill.record/"}})
    nb = new_notebook(cells=[new_code_cell("glue('claims', rows)", outputs=[out])])
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "01_pruning.ipynb")
    table = book.gather(["notebooks/01_pruning.ipynb"], src=tmp_path)
    assert list(table.quantity) == [r["quantity"] for r in rows]
    assert list(table.anchor) == ["ch01-sweep", "ch01-sweep"]  # the section each row links to
    assert table.chapter.unique().tolist() == ["notebooks/01_pruning.ipynb"]
    with pytest.raises(FileNotFoundError, match="02_weight_sharing"):
        book.gather(["notebooks/01_pruning.ipynb", "notebooks/02_weight_sharing.ipynb"], src=tmp_path)


def test_seed_stats_mean_and_sample_std_per_rate():
    rows = [dict(rate=0.5, acc=a) for a in (0.8, 0.9, 1.0)] + [dict(rate=0.9, acc=0.2)]
    rates, mean, std, n = stats.seed_stats(rows, "acc", scale=100)
    assert rates.tolist() == [0.5, 0.9] and n.tolist() == [3, 1]
    np.testing.assert_allclose(mean, [90.0, 20.0])
    np.testing.assert_allclose(std, [10.0, 0.0])


def test_over_seeds_runs_each_seed_on_its_own_cached_baseline():
    cfg = config.load("smoke", train_size=64, test_size=32, epochs=1, seeds=(0, 1))
    seen = []

    def step(cfg_s, splits_s, base_s):
        seen.append((cfg_s.seed, next(base_s.parameters()).sum().item()))
        return [dict(value=cfg_s.seed * 10)]

    rows = steps.over_seeds(cfg, step, progress=False)
    assert rows == [dict(value=0, seed=0), dict(value=10, seed=1)]
    assert seen[0][0] == 0 and seen[1][0] == 1 and not math.isclose(seen[0][1], seen[1][1])
    again = steps.over_seeds(cfg, step, progress=False)  # baselines now come from the cache
    assert again == rows and seen[2:] == seen[:2]


def test_over_seeds_parks_the_callers_models_and_gives_them_back(monkeypatch):
    """Models in ``park`` leave their device for the host during the loop and come back after,
    also when a step fails; models already on the host are not touched. No GPU here: the parked
    model's device is faked and ``masks.move`` is recorded."""
    cfg = config.load("smoke", train_size=64, test_size=32, epochs=1, seeds=(0, 1))
    held, on_cpu = toys.tiny_vgg(), toys.tiny_vgg()
    moves = []
    monkeypatch.setattr(steps.masks, "move", lambda m, d: moves.append((m, str(d))))
    device = steps.train.model_device
    monkeypatch.setattr(steps.train, "model_device", lambda m: torch.device("cuda", 0) if m is held else device(m))

    def step(cfg_s, splits_s, base_s):
        assert moves == [(held, "cpu")]  # on the host while the seeds run
        return [dict(value=1)]

    assert len(steps.over_seeds(cfg, step, progress=False, park=[held, on_cpu])) == 2
    assert moves == [(held, "cpu"), (held, "cuda:0")]
    moves.clear()

    def failing(cfg_s, splits_s, base_s):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        steps.over_seeds(cfg, failing, progress=False, park=[held])
    assert moves == [(held, "cpu"), (held, "cuda:0")]


def test_comparison_styles_claims_whose_quantities_coincide():
    # chapter 00 under the paper profile: the headline epsilon is the paper's 0.03, so two rows
    # may read alike; a Styler on a repeated index raised "Styler.apply and .map are not compatible
    # with non-unique index or columns" when the table was rendered
    rows = [dict(quantity="FGSM robust accuracy (%) at eps 0.03", paper=23.5, ours="12.0 ± 1.0", verdict="holds"),
            dict(quantity="FGSM robust accuracy (%) at eps 0.03", paper=None, ours="12.0 ± 1.0",
                 verdict="not compared")]
    html = book.comparison(rows).to_html()
    assert html.count("FGSM robust accuracy (%) at eps 0.03") == 2 and "—" in html


def _rows():
    where = dict(setting="eps 0.2, r = 0.5", refuted_by="the other side on every seed", anchor="ch04-table-1")
    return [
        book.claim("Sec. 3.4 · chapter 04", "doubles", 2.13, "1.9 ± 0.1", "does not hold: 0 of 5 seeds agree",
                   measures="robustness", **where),
        book.claim("Sec. 3.4 · chapter 04", "costs clean accuracy", 2.4, "1.0 ± 0.5", "holds: 5 of 5 seeds agree",
                   measures="clean accuracy", **where),
        book.claim("Sec. 3.1 · chapter 04", "lowers robust accuracy", 6.2, "3.0 ± 1.0", "holds (5 of 5 seeds agree)",
                   measures="robustness", **where),  # the older text form of a verdict still counts
        book.claim("Sec. 4.1 · chapter 04", "FGSM overstates", "not tested", "+30 ± 2", "holds: 5 of 5 seeds agree",
                   kind=book.FINDING, measures="robustness", **where),
        book.check("Sec. 3.1.3 · chapter 04", "hardened = masked", True, "largest gap 0.00 pp", anchor="ch04-algorithm-7",
                   measures="clean accuracy"),
    ]


def test_tally_counts_the_three_kinds_apart_and_groups_the_papers_claims_by_what_they_measure():
    claims = pd.DataFrame([dict(r, chapter="notebooks/04_robust_retraining.ipynb") for r in _rows()])
    t = book.tally(claims)
    assert list(t.index) == [("the paper's claims", "robustness"), ("the paper's claims", "clean accuracy"),
                             ("the book's findings", "all"), ("checks (by construction)", "all")]
    assert t.loc[("the paper's claims", "robustness"), ["holds", "does not hold", "rows"]].tolist() == [1, 1, 2]
    assert t.loc[("checks (by construction)", "all"), ["passed", "holds", "rows"]].tolist() == [1, 0, 1]
    counts = book.counts_of(claims)
    # the finding's "holds" and the check are not counted as the paper's
    assert counts == dict(n_paper=3, n_holds=2, n_fails=1, n_inconclusive=0, n_findings=1, n_checks=1)
    html = book.claims_table(claims, book.PAPER).to_html()
    assert html.count('<a href="../notebooks/04_robust_retraining.html#ch04-table-1">') == 3 and "|---|" not in html
    # a sentence-long cell is shown whole (a DataFrame's display cuts it at 50 characters), no row numbers
    long = "inconclusive: 100 models in 50 families, interval spans 0; 3 of 5 seeds on the claimed side"
    shown = book.text_table(pd.DataFrame({"verdict": [long]})).to_html()
    assert long in shown and "row_heading" not in shown
    # its smaller type comes from the book's stylesheet, which must know the class
    assert 'class="rclib-claims"' in html
    assert "table.rclib-claims" in (Path(__file__).resolve().parent.parent / "_static" / "rclib.css").read_text()
    checks = book.claims_table(claims, book.CHECK).to_html()
    assert "hardened = masked" in checks and 'href="../notebooks/04_robust_retraining.html#ch04-algorithm-7"' in checks
    # the count table for display: words in its headers, the counts unchanged
    shown = book.readable(t)
    assert list(shown.index.names) == ["kind of row", "what it measures"] and "rows in all" in shown.columns
    assert shown.loc[("the paper's claims", "robustness"), "rows in all"] == 2 and "rows" in t.columns


def test_a_row_links_to_the_section_named_by_its_anchor_and_a_bad_anchor_is_refused():
    where = dict(measures="robustness", setting="x", refuted_by="y")
    row = book.claim("Table 1 · chapter 04", "q", 1, 2, "holds: 2 of 2 seeds agree", anchor="ch04-table-1", **where)
    assert row["anchor"] == "ch04-table-1"
    assert book.section_link("notebooks/04_robust_retraining.ipynb", row["anchor"]) == \
        "../notebooks/04_robust_retraining.html#ch04-table-1"
    for bad in ("table-1", "ch4-table-1", "#ch04-table-1", "ch04-Table-1", "ch04_table_1", "ch04-", "", None):
        with pytest.raises(ValueError, match="anchor"):
            book.claim("s", "q", 1, 2, "holds", anchor=bad, **where)
        with pytest.raises(ValueError, match="anchor"):
            book.check("s", "q", True, "d", anchor=bad, measures="size")
    with pytest.raises(TypeError):
        book.claim("s", "q", 1, 2, "holds", **where)  # required
    with pytest.raises(ValueError, match="names chapter 03"):  # a label of another chapter would not be on the page
        book.section_link("notebooks/04_robust_retraining.ipynb", "ch03-roughness-measures")
    with pytest.raises(ValueError, match="execute the chapter again"):  # a row glued before rows had anchors
        book.section_link("notebooks/04_robust_retraining.ipynb", float("nan"))


def test_readable_puts_words_in_a_tables_headers_and_refuses_identifiers():
    study = pd.DataFrame({"label": ["baseline", "global r=0.5"], "accuracy": ["97.0", "90.1"],
                          "pca_boundary_length": ["1.20", "1.35"]}).set_index("label")
    shown = book.readable(study)
    assert list(shown.columns) == ["clean accuracy (%)", "PCA map: boundary length (map sides)"]
    assert shown.index.name == "model" and list(shown.index) == ["baseline", "global r=0.5"]  # rows are data
    assert list(study.columns) == ["accuracy", "pca_boundary_length"]  # the data keep their names
    sweep = pd.DataFrame({("accuracy", "global"): [1.0], ("robust_accuracy", "global"): [0.5]},
                         index=pd.Index([0.5], name="rate"))
    sweep.columns.names = [None, "method"]
    shown = book.readable(sweep, {"robust_accuracy": "FGSM robust accuracy at eps 0.1 (%)"})
    assert list(shown.columns) == [("clean accuracy (%)", "global"), ("FGSM robust accuracy at eps 0.1 (%)", "global")]
    assert shown.index.name == "prune rate r" and shown.columns.names == [None, "method"]
    with pytest.raises(ValueError, match="approx_mb"):
        book.readable(pd.DataFrame({"approx_mb": [1.0]}))
    assert list(book.readable(pd.DataFrame({"approx_mb": [1.0]}), {"approx_mb": "size (MB)"}).columns) == ["size (MB)"]


def test_a_broken_check_stops_with_its_numbers_and_a_claim_needs_its_setting():
    with pytest.raises(book.CheckFailed, match="hardened = masked.*largest gap 1.39 pp"):
        book.check("Sec. 3.1.3 · chapter 01", "hardened = masked", False, "largest gap 1.39 pp", anchor="ch01-sweep",
                   measures="clean accuracy")
    with pytest.raises(ValueError, match="measures="):
        book.claim("s", "q", 1, 2, "holds", anchor="ch01-sweep", measures="vibes", setting="x", refuted_by="y")
    with pytest.raises(ValueError, match="book.check"):
        book.claim("s", "q", 1, 2, "holds", anchor="ch01-sweep", measures="size", setting="x", refuted_by="y",
                   kind=book.CHECK)


def test_a_broken_check_fails_its_chapter(tmp_path):
    """A chapter cell that calls book.check on a property that does not hold raises, so papermill
    stops the chapter there and nothing after it runs."""
    import papermill

    nb = new_notebook(cells=[new_code_cell("from rclib.report import book\n"
                                           "book.check('chapter 01', 'hardened = masked', 0.0139 == 0, "
                                           "'largest gap 1.39 pp', anchor='ch01-sweep', measures='clean accuracy')"),
                             new_code_cell("after = True")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    with pytest.raises(papermill.PapermillExecutionError, match="CheckFailed"):
        papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), progress_bar=False,
                                   kernel_name="python3")
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert not out.cells[-1].get("outputs") and out.cells[-1].get("execution_count") is None
