"""Every chapter in _toc.yml, executed with papermill under the smoke profile.

Checks the committed notebooks are clean, that each chapter runs and produces its figures and
glued numbers, that a bad parameter fails in the first cell without writing artifacts, and that
two runs with the same profile and seed give identical numbers.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import nbformat
import pytest
from conftest import WARM_01

from rclib.core import params
from rclib.core.paths import project_root
from rclib.experiments import distance_study, setup
from rclib.report import book
from rclib.report.runner import ChapterFailed, run_notebook, toc_notebooks

ROOT = project_root()
NOTEBOOKS = toc_notebooks(ROOT)
CHAPTERS = [nb for nb in NOTEBOOKS if nb.parts[0] == "notebooks"]
PAGES = [nb for nb in NOTEBOOKS if nb.parts[0] == "book"]  # gather the chapters' results
TIMEOUT = 600  # seconds per cell; a smoke chapter takes well under a minute in all


@pytest.fixture
def artifact_root(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv("RCLIB_ARTIFACTS", str(root))
    return root


def _run(nb: Path, out: Path, **params):
    run_notebook(ROOT / nb, out, {"profile": "smoke", **params}, TIMEOUT, progress=False)
    return nbformat.read(out, as_version=4)


def test_toc_lists_the_chapters():
    assert Path("notebooks/00_baseline.ipynb") in NOTEBOOKS
    assert all((ROOT / nb).exists() for nb in NOTEBOOKS)


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_committed_notebook_is_clean(nb):
    data = json.loads(nb.read_text())
    code = [c for c in data["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") for c in code), f"{nb.name} is committed with outputs"
    assert not any(c.get("execution_count") for c in code), f"{nb.name} has execution counts"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"
    src = "".join(params[0]["source"])
    assert 'profile = "cpu"' in src
    for line in src.splitlines():  # papermill's parameter inspection breaks on '=' in comments
        assert "=" not in line.partition("#")[2], f"'=' inside a comment: {line!r}"


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_under_smoke(nb, smoke_book):
    path = smoke_book / "_build" / "src" / nb
    out = nbformat.read(path, as_version=4)
    outputs = [o for c in out.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 2, "a chapter shows its figures"
    injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "remove-cell" in injected[0].metadata["tags"]
    values = book.glued(path)
    assert values, "a chapter glues its key numbers into the prose"
    for name, value in values.items():
        if isinstance(value, float):
            assert math.isfinite(value), name


def test_chapters_cache_their_models(smoke_book):
    assert any((smoke_book / "artifacts").rglob("*.safetensors"))


def _glued(smoke_book, stem: str) -> dict:
    return book.glued(smoke_book / "_build" / "src" / "notebooks" / f"{stem}.ipynb")


def test_baseline_numbers(smoke_book):
    values = _glued(smoke_book, "00_baseline")
    clean, robust = (float(values[k].split(" ± ")[0]) for k in ("clean_acc", "robust_acc"))
    assert 20 < clean <= 100  # smoke trains briefly but well above chance (10%)
    assert 0 <= robust <= clean
    _check_claims(values, 4)
    # the operating point: the baselines' mean FGSM robust accuracy within 1 point of the paper's 12.0 %
    assert values["config"]["epsilon"] == "match" or isinstance(values["config"]["epsilon"], float)
    assert abs(float(values["robust_acc"].split(" ± ")[0]) - 12.0) <= 1.0
    assert values["n_train"] == 512 and values["n_test"] == 128  # the smoke profile's sizes
    assert values["pruned_mib"] == pytest.approx(263.9, abs=0.05)  # VGG16 at 50%: the paper's entry


def test_pruning_numbers(smoke_book):
    values = _glued(smoke_book, "01_pruning")
    assert values["harden_diff"] < 1e-5  # Alg 4: same function
    assert values["hard_gap"] == 0  # masked and hardened have identical accuracy at every rate
    assert values["harden_params"] < values["base_params"] and values["flop_ratio"] > 1
    assert values["layer_spread"] < 0.5  # Alg 2: uniform sparsity up to rounding
    _check_claims(values, 9)
    assert sum(r["kind"] == "check" for r in values["claims"]) == 3  # by construction: never tallied


def _check_claims(values: dict, n: int) -> None:
    """A chapter's claims: each row has the paper's side, ours with its spread, and a verdict
    that rclib.report.verdict computed (one of its three outcomes, with the reason when it has one)."""
    from rclib.report import verdict

    claims = values["claims"]
    assert len(claims) == n
    for row in claims:
        assert set(row) == {"section", "quantity", "paper", "ours", "verdict", "kind", "measures", "setting",
                            "refuted_by", "anchor"}
        assert row["kind"] in book.KINDS and row["measures"] in book.MEASURES and row["setting"], row
        allowed = (book.PASSED,) if row["kind"] == book.CHECK else verdict.OUTCOMES
        assert book.outcome(row["verdict"]) in allowed, row
        # the row links to a section of its own chapter: the label is above a heading there
        chapter = nbformat.read(next((ROOT / "notebooks").glob(f"{row['anchor'][2:4]}_*.ipynb")), as_version=4)
        markdown = "\n".join(c.source for c in chapter.cells if c.cell_type == "markdown")
        assert re.search(rf"^\({re.escape(row['anchor'])}\)=\n#+ ", markdown, re.M), row


def test_same_profile_and_seed_give_identical_numbers(smoke_book, rerun_00):
    """Chapter 00 rerun from an empty cache with the shared build's profile and overrides gives
    that build's numbers exactly (both trained their baselines from scratch, in other processes)."""
    assert book.glued(rerun_00 / "00_baseline.ipynb") == _glued(smoke_book, "00_baseline")


def test_weight_sharing_numbers(smoke_book):
    values = _glued(smoke_book, "02_weight_sharing")
    assert values["exact"] == "identical"  # the compressed file loads back bit-exact
    # VGG16 pruned to 50% with 8/5-bit sharing, by the paper's formula: its Table 1 says 45.5
    vgg = next(r for r in values["claims"] if r["quantity"].startswith("the paper's 45.5 MB"))
    mean = float(vgg["ours"].split(" ± ")[0])
    assert vgg["paper"] == 45.5 and mean == pytest.approx(45.1, abs=0.5) and vgg["kind"] == "finding"
    assert values["ours_file"] < values["ours_dense"]
    assert values["rho_first"] > 1 > values["rho_last"]  # a 144-weight layer cannot amortise 256 floats
    _check_claims(values, 5)


def test_boundary_numbers(smoke_book):
    values = _glued(smoke_book, "03_boundary_smoothness")
    assert values["n_working"] >= 1
    for key in ("r_pca", "r_local"):  # NaN (glued as its text) when too few families of models work
        assert values[key] == "nan" or -1 <= values[key] <= 1
    _check_claims(values, 7)


def test_robust_retraining_numbers(smoke_book):
    values = _glued(smoke_book, "04_robust_retraining")
    assert tuple(values["config"]["seeds"]) == (0, 3)  # the shared build's override of the smoke seeds
    assert values["gain_paper"] == pytest.approx(25.6 / 12.0)
    gain = next(r for r in values["claims"] if r["quantity"].startswith("Alg 7 doubles"))
    assert gain["paper"] == pytest.approx(2.13, abs=0.01) and float(gain["ours"].split(" ± ")[0]) > 0
    # judged at the operating point, which is also Algorithm 7's training epsilon
    assert f"epsilon {values['config']['epsilon']:g}" in gain["setting"]
    assert values["config"]["adv_epsilon"] == values["config"]["epsilon"]
    recover = next(r for r in values["claims"] if r["quantity"].startswith("Alg 7 wins back all"))
    assert recover["paper"] == "319 %" and "r = 0.5" in recover["setting"]  # the paper's rate, the paper's units
    _check_claims(values, 9)


def test_stronger_attacks_numbers(smoke_book):
    values = _glued(smoke_book, "05_stronger_attacks")
    assert tuple(values["config"]["seeds"]) == (0, 3)  # the shared build's override of the smoke seeds
    assert values["subset"] == values["config"]["attack_sample"] == 20 and values["square_queries"] > 0
    assert 0 <= values["n_pass"] <= values["n_checks"] == 8 * 5  # 8 models x 5 masking checks
    assert all(r["kind"] == "finding" for r in values["claims"])  # the paper tests none of this
    # the worst case is an AND over attacks that include FGSM: it can never exceed FGSM
    assert values["over_min"] >= 0 and values["over_max"] >= values["over_min"]
    for name in ("alg7_worst", "base_worst", "madry_worst"):
        assert 0 <= float(values[name].split(" ± ")[0]) <= 100
    _check_claims(values, 5)


def test_boundary_distance_numbers(smoke_book):
    values = _glued(smoke_book, "06_boundary_distance")
    assert values["subset"] == values["config"]["attack_sample"] == 20
    assert values["halvings"] > 0 and 0 < values["resolution"] < 0.01
    # every PGD-10 point of chapter 05 was compared with its bracket, and the check is a check row
    assert values["tolerance_pp"] == 100 * distance_study.bracket_tolerance(20) == 10.0  # two of the 20 inputs
    assert values["n_points"] > 0 and 0 <= values["worst_gap"] <= values["tolerance_pp"]
    kinds = [r["kind"] for r in values["claims"]]
    assert kinds.count("paper") == 6 and kinds.count("finding") == 1 and kinds.count("check") == 1
    _check_claims(values, 8)


def test_every_chapter_receives_every_override(smoke_book):
    """`python -m rclib book --profile smoke -p seed 3 -p width 4 -p seeds "[0, 3]"` (the shared
    smoke build) runs every chapter with those values: each chapter's glued configuration says so."""
    for nb in NOTEBOOKS:
        cfg = book.glued(smoke_book / "_build" / "src" / nb)["config"]
        assert (cfg["profile"], cfg["seed"], cfg["width"], tuple(cfg["seeds"])) == ("smoke", 3, 4, (0, 3)), nb


def test_every_chapter_declares_every_config_field():

    for nb in NOTEBOOKS:
        cells = nbformat.read(ROOT / nb, as_version=4).cells
        cell = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
        assert cell.source == params.parameters_source(), f"{nb}: regenerate its parameters cell"


@pytest.mark.parametrize("nb", CHAPTERS + PAGES, ids=lambda p: p.stem)
def test_plumbing_is_hidden_and_algorithms_shown(nb):
    """Every plumbing cell (:func:`rclib.report.book.is_plumbing`) is tagged to hide its code;
    a cell listing an algorithm (``book.source``) holds only that and is shown; every other
    open cell runs rclib (an experiment, a check), never plain table shuffling."""
    data = nbformat.read(ROOT / nb, as_version=4)
    rclib_names = {alias.asname or alias.name for c in data.cells if c.cell_type == "code"
                   for stmt in ast.parse(c.source).body if isinstance(stmt, ast.ImportFrom)
                   and (stmt.module or "").startswith("rclib") for alias in stmt.names}
    calls_rclib = re.compile(rf"\b(?:{'|'.join(sorted(rclib_names))})\.\w+")
    shown = 0
    for c in data.cells:
        tags = set(c.metadata.get("tags", []))
        if c.cell_type != "code" or "parameters" in tags:
            continue
        hidden = bool(tags & book.HIDDEN_TAGS)
        where = f"{nb.stem}: {c.source.splitlines()[0][:70]!r}"
        if "book.source(" in c.source:
            assert not hidden and not book.is_plumbing(c.source), f"{where} lists an algorithm: shown, alone"
            assert all(line.startswith("book.source(") for line in c.source.splitlines()), where
        elif book.is_plumbing(c.source):
            assert "hide-input" in tags or hidden, f"{where} is plumbing: tag it hide-input"
        elif not hidden:
            assert calls_rclib.search(c.source), f"{where} is shown but runs nothing of rclib"
        shown += not hidden
    if nb in CHAPTERS:
        assert shown >= 2, f"{nb.stem} shows no algorithm or experiment cell"


# one bad value per chapter, each refused by the first code cell under plain papermill
FIRST_CELL_REFUSALS = {
    "00_baseline": (dict(epsilom=0.2), "did you mean 'epsilon'?"),
    "01_pruning": (dict(prune_rates="[0.5, 0.5]"), "prune_rates="),
    "02_weight_sharing": (dict(conv_bits=0), "conv_bits=0"),
    "03_boundary_smoothness": (dict(resolution=1), "resolution=1"),
    "04_robust_retraining": (dict(seeds="[0, 4294967296]"), "seeds="),
    "05_stronger_attacks": (dict(epsilons="[0.1, -0.1]"), "epsilons="),
}


def _first_work_cell(nb: Path) -> str:
    code = [c for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code"]
    return next(c.source for c in code if "parameters" not in c.metadata.get("tags", []))


@pytest.mark.parametrize("nb", CHAPTERS + PAGES, ids=lambda p: p.stem)
def test_every_page_checks_its_parameters_before_any_work(nb):
    """The first code cell after the parameters imports and then reads the configuration through
    setup.from_notebook, which validates it, before anything else can run."""
    body = ast.parse(_first_work_cell(nb)).body
    first = next(stmt for stmt in body if not isinstance(stmt, (ast.Import, ast.ImportFrom)))
    assert ast.unparse(first) == "cfg = setup.from_notebook(globals())", nb.stem


@pytest.mark.parametrize("stem", sorted(FIRST_CELL_REFUSALS))
def test_each_chapters_bad_parameter_is_refused_by_its_first_cell(stem):
    """What papermill injects for each chapter's bad parameter, read back as the first cell reads
    it (IPython's input history), is refused naming the parameter. Executing one chapter below
    shows the whole path; the other chapters share its first cell (test above)."""
    params, text = FIRST_CELL_REFUSALS[stem]
    injected = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    namespace = {"In": ["", injected], "profile": "smoke", **params}
    with pytest.raises(ValueError, match=re.escape(text)):
        setup.from_notebook(namespace)


def test_bad_parameter_stops_a_chapter_in_its_first_cell(tmp_path, artifact_root):
    nb = Path("notebooks/03_boundary_smoothness.ipynb")
    params, text = FIRST_CELL_REFUSALS[nb.stem]
    out = tmp_path / "bad.ipynb"
    with pytest.raises(ChapterFailed) as err:
        _run(nb, out, **params)
    assert "ValueError" in str(err.value) and text in str(err.value)
    code = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in code]
    first_work = next(i for i, t in enumerate(tags) if "parameters" not in t and "injected-parameters" not in t)
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed == [first_work]
    assert not artifact_root.exists() or not any(artifact_root.rglob("*"))


def test_chapter_01_gives_the_same_numbers_from_a_cold_and_a_warm_cache(smoke_book):
    """The BatchNorm-recalibration figure once read 13.28 cold and 14.06 warm: it drew batches
    from a loader whose shuffling state depended on whether the sweep was computed or loaded.
    The shared build computed chapter 01's sweep (cold); its rerun on that cache loaded it (warm,
    conftest's ``WARM_01``)."""
    cold, warm = _glued(smoke_book, "01_pruning"), book.glued(smoke_book / WARM_01)
    timings = {"speed1", "speed_big", "v_speed", "speed_clause"}  # wall-clock latencies, measured afresh
    for r in (cold, warm):
        r["claims"] = [row for row in r["claims"] if not row["section"].startswith("Fig. 4")]
    cold, warm = ({k: v for k, v in r.items() if k not in timings} for r in (cold, warm))
    assert "recal_first" in cold and cold == warm


def test_claims_page_and_introduction_gather_every_chapters_claims(smoke_book):
    """The claims page lists every chapter's claims, and its counts add up; the introduction
    renders the same rows (as Markdown) without a typed outcome."""
    assert [nb.stem for nb in PAGES] == ["intro", "claims"]
    src = smoke_book / "_build" / "src"
    rows = [r for nb in CHAPTERS for r in book.glued(src / nb).get("claims", [])]
    values = book.glued(src / "book" / "claims.ipynb")
    intro = book.glued(src / "book" / "intro.ipynb")
    kinds = [r["kind"] for r in rows]
    assert values["n_paper"] == kinds.count("paper") >= 20
    assert values["n_holds"] + values["n_fails"] + values["n_inconclusive"] == values["n_paper"]
    assert (values["n_findings"], values["n_checks"]) == (kinds.count("finding"), kinds.count("check"))
    names = ("n_paper", "n_holds", "n_fails", "n_inconclusive", "n_findings", "n_checks")
    assert {k: intro[k] for k in names} == {k: values[k] for k in names}  # the two pages count alike
    for page, shown in zip(PAGES, ("text/markdown", "text/html")):  # the intro's list, the claims page's tables
        nb = nbformat.read(src / page, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert any(shown in o.get("data", {}) for o in outputs), page
        assert not [o for o in outputs if o.get("output_type") == "error"], page
    claims_html = (smoke_book / "_build" / "html" / "book" / "claims.html").read_text()
    # the main tables are HTML tables, not pipe-table text; every kind has its own section
    assert "|---|" not in claims_html and claims_html.count("<table") >= 4
    for title in ("The paper", "own findings", "Checks"):
        assert title in claims_html

def test_the_book_runs_chapters_side_by_side_and_05_after_04(smoke_book):
    """After chapter 00 the runner executes chapters two at a time on a machine with two cores
    (each runs one torch thread); chapter 05, which attacks chapter 04's cached models, starts only
    once chapter 04 is done, and chapter 03 once chapter 01 has trained Alg 5's trajectory
    (``rclib.__main__.AFTER``)."""
    import os

    lines = (smoke_book / "build.log").read_text().splitlines()
    started = {line.split("] ", 1)[1].split(" (")[0]: i for i, line in enumerate(lines)
               if line.startswith("[") and "] notebooks/" in line}
    finished = {line.split()[0]: i for i, line in enumerate(lines)
                if line.strip().startswith("notebooks/") and " done in " in line}
    assert finished["notebooks/04_robust_retraining.ipynb"] < started["notebooks/05_stronger_attacks.ipynb"]
    assert finished["notebooks/01_pruning.ipynb"] < started["notebooks/03_boundary_smoothness.ipynb"]
    assert finished["notebooks/05_stronger_attacks.ipynb"] < started["notebooks/06_boundary_distance.ipynb"]
    assert started["notebooks/00_baseline.ipynb"] < min(v for k, v in started.items() if not k.startswith("notebooks/00"))
    if (os.cpu_count() or 1) >= 2:
        assert any("2 of 2 at once" in line for line in lines)
