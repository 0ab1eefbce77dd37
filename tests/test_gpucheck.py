"""``python -m rclib gpu-check`` at its tiny CPU size: the same code the GPU run takes, in seconds.
The reports must hold every measurement with finite positive numbers, and a budget that runs out
must give a report that says it is partial instead of an error."""

from __future__ import annotations

import json
import math

from rclib import __main__ as cli
from rclib.core import config
from rclib.experiments import gpucheck, projection


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_check_measures_every_stage_and_writes_both_reports(tmp_path):
    report = gpucheck.run(tmp_path, budget_s=120, size="tiny", device="cpu", progress=False)
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["complete"] and saved["skipped"] == []
    assert set(saved["throughput"]) == {"bf16 + channels_last", "fp32"}
    for runtime in saved["throughput"].values():
        assert list(runtime) == list(gpucheck.OPS)
        assert all(_positive(m["images_per_s"]) and _positive(m["seconds"]) for m in runtime.values())
    a = saved["agreement"]
    assert 0 <= a["prediction_agreement"] <= 1 and 0.99 <= a["fgsm_pixel_agreement"] <= 1  # gradients stay fp32
    assert abs(a["accuracy_difference"]) <= 1 and _positive(saved["decode"]["images_per_s"])
    assert saved["memory"] is None and isinstance(saved["decode_bound"], bool)  # device memory: CUDA only
    p = saved["projection"]
    assert p["complete"] and _positive(p["total_s"])
    assert math.isclose(sum(r["seconds"] for r in p["rows"]), p["total_s"])
    assert all(_positive(r["images"]) and f"{r['images']:,} / " in r["arithmetic"] for r in p["rows"])
    assert saved["elapsed_s"] < 120
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| PGD-10 |" in md and "Projected `paper` book" in md and "complete" in md
    assert (tmp_path / "folder-tiny" / "n00000000" / "img_00000.JPEG").read_bytes()[:2] == b"\xff\xd8"  # JPEG


def test_a_spent_budget_stops_cleanly_with_a_partial_report(tmp_path):
    report = gpucheck.run(tmp_path, budget_s=1e-6, size="tiny", device="cpu", progress=False)
    assert not report["complete"] and len(report["skipped"]) == 2 * len(gpucheck.OPS) + 2
    assert report["throughput"] == {} and not report["projection"]["complete"]
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved["complete"] is False and "PARTIAL" in (tmp_path / "gpu-check.md").read_text()


def test_projection_counts_the_paper_profile_and_shows_its_arithmetic():
    rates = {op: 100.0 for op in gpucheck.OPS}
    p = projection.project(config.profile_config("paper"), rates, decode=50.0)
    rows = {(r["chapter"], r["work"]): r for r in p["rows"]}
    alg5 = rows[("01", "Alg 5: 9 steps x 1 epochs")]  # 0.9 / 0.1 steps over 40k training images
    assert alg5["images"] == 9 * 40_000 and alg5["images_per_s"] == 50.0  # training waits for decoding
    assert alg5["arithmetic"] == "360,000 / 50.0 images/s = 7,200 s"
    assert rows[("00", "clean accuracy")]["images"] == 10_000
    assert math.isclose(p["total_s"], sum(r["images"] / r["images_per_s"] for r in p["rows"]))
    assert not projection.project(config.profile_config("paper"), {}, None)["complete"]


def test_command_refuses_a_bad_budget_before_any_work(tmp_path, capsys):
    assert cli.main(["gpu-check", "--budget", "0", "--out", str(tmp_path)]) == 2
    assert "--budget 0.0 is not allowed" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_command_writes_the_reports_where_asked(tmp_path):
    assert cli.main(["gpu-check", "--device", "cpu", "--out", str(tmp_path), "--quiet"]) == 0  # auto: tiny on a CPU
    assert json.loads((tmp_path / "gpu-check.json").read_text())["size"] == "tiny"
