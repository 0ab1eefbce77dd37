"""Refusals before any work: the command line (exit 2, one line naming the option), torchrun
variables that do not fit, inputs judged by meaning, bounded checks, folder walks that end."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from toys import image_folder

from rclib.__main__ import main
from rclib.core import config, walk
from rclib.data import checks, datasets
from rclib.experiments import setup

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _main(tmp_path, *args: str, env: dict[str, str] | None = None) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCLIB_ARTIFACTS", str(tmp_path / "artifacts"))
        for name in ("TQDM_DISABLE", "OMP_WAIT_POLICY", *TORCHRUN_VARS):
            mp.delenv(name, raising=False)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        return main(list(args))


def _refused(capsys, code: int, *texts: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAILED before running anything: "), err
    assert all(t in lines[0] for t in texts), err
    return lines[0]


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["retrain", "--step", "clean"], ["book"], ["run", "notebooks/00_baseline.ipynb"]])
def test_p_profile_clashing_with_profile_is_refused(tmp_path, capsys, command):
    code = _main(tmp_path, *command, "--profile", "smoke", "-p", "profile", "paper", "--out", str(tmp_path)) \
        if command[0] != "retrain" else _main(tmp_path, *command, "--profile", "smoke", "-p", "profile", "paper")
    _refused(capsys, code, "-p profile 'paper'", "--profile 'smoke'")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "_build").exists()


def test_same_parameter_twice_with_other_values_is_refused(tmp_path, capsys):
    code = _main(tmp_path, "retrain", "--step", "clean", "--profile", "smoke", "-p", "seed", "1", "-p", "seed", "2")
    _refused(capsys, code, "-p seed", "(1 and 2)")


def test_run_never_overwrites_a_source_notebook(tmp_path, capsys):
    nb = ROOT / "notebooks" / "00_baseline.ipynb"
    before = nb.read_bytes()
    for out in (nb, ROOT / "notebooks" / "01_pruning.ipynb", Path("notebooks/00_baseline.ipynb")):
        code = _main(tmp_path, "run", str(nb), "--profile", "smoke", "-o", str(out))
        _refused(capsys, code, f"-o/--output {out}", "source notebook")
    assert nb.read_bytes() == before


def _under_a_file(t: Path) -> Path:
    (t / "f").write_text("x")
    return t / "f" / "out.ipynb"


@pytest.mark.parametrize("make, text", [
    (lambda t: Path("/dev/null"), "not a regular file"),
    (lambda t: t / "x.ipynb" if (t / "x.ipynb").mkdir() is None else None, "not a regular file"),  # a folder
    (_under_a_file, "is a file, so no folder can be made"),
    (lambda t: t / "out", "an .ipynb file"),
])
def test_run_refuses_an_output_it_cannot_write_before_running(tmp_path, capsys, make, text):
    start = time.perf_counter()
    code = _main(tmp_path, "run", str(ROOT / "notebooks" / "00_baseline.ipynb"), "--profile", "smoke",
                 "-o", str(make(tmp_path)))
    _refused(capsys, code, "-o/--output", text)
    assert time.perf_counter() - start < 60  # refused up front, not after the chapter ran


def test_run_refuses_a_missing_notebook_in_one_line(tmp_path, capsys):
    code = _main(tmp_path, "run", str(tmp_path / "nope.ipynb"), "--profile", "smoke")
    _refused(capsys, code, "no such notebook file")


@pytest.mark.parametrize("command", ["book", "run", "build"])
def test_out_that_is_a_file_or_cannot_be_made_is_refused(tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    extra = [str(ROOT / "notebooks" / "00_baseline.ipynb")] if command == "run" else []
    for out, text in ((tmp_path / "file", "it is a file"), (tmp_path / "file" / "sub", "is a file, so no folder")):
        code = _main(tmp_path, command, *extra, "--out", str(out))
        _refused(capsys, code, f"--out {out}", text)


@pytest.mark.parametrize("env, text", [
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5, WORLD_SIZE=2"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}, "MASTER_PORT='99999'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK <= RANK"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_RANK < LOCAL_WORLD_SIZE"),
    ({"WORLD_SIZE": "٣"}, "WORLD_SIZE='٣'"),  # a digit to str.isdigit, not to int()
])
def test_torchrun_variables_that_do_not_fit_are_refused(tmp_path, capsys, env, text):
    code = _main(tmp_path, "retrain", "--step", "clean", "--profile", "smoke", env=env)
    _refused(capsys, code, text)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("option, value", [("--timeout", "inf"), ("--join-timeout", "0"), ("--join-timeout", "nan")])
def test_timeouts_must_be_finite_and_positive(tmp_path, capsys, option, value):
    _refused(capsys, _main(tmp_path, "evaluate", "--step", "clean", "--profile", "smoke", option, value), option)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_comes_ends_the_wait_after_the_join_timeout(tmp_path, capsys):
    """Rank 1 of 2 with nobody at MASTER_ADDR: one line and exit 1 after --join-timeout, not 1800 s."""
    env = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    start = time.perf_counter()
    code = _main(tmp_path, "retrain", "--profile", "smoke", "--step", "clean", "--join-timeout", "1", "--quiet", env=env)
    took = time.perf_counter() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("FAILED: rank 1 of 2 could not join"), lines
    assert "--join-timeout 1" in lines[0] and took < 30
    assert not (tmp_path / "artifacts").exists()


# --- inputs by meaning --------------------------------------------------------------------------

def test_training_nothing_is_refused_but_weights_alone_are_a_model(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"epochs=0 with weights='none' is not allowed: it trains nothing"):
        setup.load("smoke", epochs=0)
    path = tmp_path / "w.safetensors"
    cfg = config.load("smoke", width=8, hidden=32)
    from rclib.nn import models

    save_file(models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,)).state_dict(), str(path))
    assert config.load("smoke", width=8, hidden=32, epochs=0, weights=str(path)).epochs == 0


@pytest.mark.parametrize("dtype, text", [(torch.int8, "file I8, model F32"), (torch.bool, "file BOOL, model F32"),
                                         (None, "holds NaN or infinite values")])
def test_weights_files_are_checked_for_dtype_and_finiteness(tmp_path, dtype, text):
    from rclib.nn import models

    cfg = config.load("smoke", width=8, hidden=32)
    state = models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,)).state_dict()
    name = "features.0.weight"
    state[name] = torch.full_like(state[name], float("nan")) if dtype is None else state[name].to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"weights='{path}' is not allowed: .*{name}.*" if dtype else text) as err:
        setup.load("smoke", width=8, hidden=32, weights=str(path))
    assert text in str(err.value) and "lr" not in str(err.value)  # names the file, not the learning rate


def test_batch_norm_batch_of_one(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=1 is not allowed with batch_norm=True"):
        setup.load("smoke", batch_size=1)
    assert config.load("smoke", batch_size=1, batch_norm=False).batch_size == 1
    # a last batch of one image (513 = 8 x 64 + 1): that image is dropped, the rest train
    cfg = config.load("smoke", train_size=513, test_size=64, epochs=1)
    loader = datasets.load(cfg).train
    assert loader.drop_last and len(loader) == 8
    assert not datasets.load(config.load("smoke", train_size=512, test_size=64)).train.drop_last
    from rclib.experiments import steps

    model, metrics, _ = steps.baseline(cfg, datasets.load(cfg), progress=False)
    assert 0 <= metrics["clean_accuracy"] <= 1


@pytest.mark.parametrize("fraction, side", [(0.001, "2 test image"), (0.999, "1 training image")])
def test_a_split_that_leaves_a_class_out_is_refused(fraction, side):
    with pytest.raises(ValueError, match=rf"test_fraction={fraction} is not allowed: .* leaves {side}"):
        setup.load("smoke", test_fraction=fraction, train_size=0, test_size=0)


def test_value_checks_cost_little_whatever_the_value():
    bomb, prev = "[&a [1,1,1,1,1,1,1,1,1]", "a"
    for name in "bcdefghij":  # 9**10 entries once expanded; a few hundred characters as text
        bomb += f", &{name} [" + ",".join([f"*{prev}"] * 9) + "]"
        prev = name
    bomb += "]"
    for value, text in ((bomb, "every entry must be a number"), (list(range(10**6)), "at most 10,000 entries"),
                        ("x" * (config.MAX_TEXT + 1), "at most 100,000 characters")):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=text) as err:
            setup.load("smoke", seeds=value)
        assert time.perf_counter() - start < 5 and len(str(err.value)) < 2000


# --- folder walks ---------------------------------------------------------------------------------

def test_walk_ends_on_a_link_cycle_and_matches_torchvision_otherwise(tmp_path):
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path / "f", ["a", "b"], 3, size=(8, 8))
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / "x.png").write_bytes((root / "a" / "img0.png").read_bytes())
    (root / "b" / "more").symlink_to(root / "a" / "sub", target_is_directory=True)  # a plain link: followed
    tv = ImageFolder(str(root)).samples
    ours = datasets._bounded_folder(ImageFolder)(str(root)).samples
    assert ours == tv and len(ours) == 8
    (root / "a" / "loop").symlink_to(".", target_is_directory=True)  # a -> . : os.walk would never end
    start = time.perf_counter()
    assert checks.image_folder_classes(root) == {"a": 4, "b": 4}
    assert len(datasets._bounded_folder(ImageFolder)(str(root)).samples) == 8
    assert time.perf_counter() - start < 10


def test_walk_refuses_kernel_file_systems_and_bounds_entries(tmp_path):
    with pytest.raises(ValueError, match=r"data_dir='/proc' is not allowed: .*kernel file system"):
        setup.load("smoke", dataset="folder", data_dir="/proc")
    root = image_folder(tmp_path / "f", ["a", "b"], 3, size=(8, 8))
    (root / "a" / "proc").symlink_to("/proc", target_is_directory=True)
    assert checks.image_folder_classes(root) == {"a": 3, "b": 3}  # the link into /proc is not entered
    with pytest.raises(walk.TooLarge, match="more than 4 entries"):
        list(walk.files(root, max_entries=4))
