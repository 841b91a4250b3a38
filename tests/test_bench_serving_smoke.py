"""The serving benchmark end to end in --quick mode, so that it cannot rot (the figures are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = {"xpeft", "xpeft_one", "lora", "lora_one"}


@pytest.mark.slow
def test_serving_benchmark_reports_every_method_ratio_and_target(tmp_path):
    out = tmp_path / "serving.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_serving.py"),
        "--quick",
        "--profiles",
        "40",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert {"git", "machine", "setup", "results", "ratios", "targets", "notes"} <= set(report)
    assert len(report["git"]["commit"]) == 40
    setup = report["setup"]
    assert (setup["profiles"], setup["batch"], setup["resident"]) == (40, 8, 16)
    assert set(report["results"]) == METHODS
    for method, result in report["results"].items():
        assert result["peak_rss_mb"] >= result["rss_after_setup_mb"] > 0, method
        assert result["requests_per_s"] > 0 and result["resident_at_end"] <= setup["resident"], method
    xpeft, lora = report["results"]["xpeft"], report["results"]["lora"]
    # every profile served once, the least recently used deleted beyond the resident limit
    assert xpeft["requests"] == xpeft["distinct_profiles"] == 40 and xpeft["deletes"] == 40 - 16
    assert lora["requests"] == lora["distinct_profiles"] == setup["lora_requests"]
    assert (
        report["results"]["xpeft_one"]["distinct_profiles"] == report["results"]["lora_one"]["distinct_profiles"] == 1
    )
    assert 0 < xpeft["composed_cache_entries_per_layer_at_end"] <= setup["xpeft"]["composed_cache_size"]
    ratios = report["ratios"]
    assert ratios["xpeft_over_lora_requests_per_s_same_prefix"] == pytest.approx(
        xpeft["prefix"]["requests_per_s"] / lora["requests_per_s"]
    )
    assert ratios["xpeft_peak_rss_profiles_over_one"] == pytest.approx(
        xpeft["peak_rss_mb"] / report["results"]["xpeft_one"]["peak_rss_mb"]
    )
    (target,) = report["targets"].values()
    assert target["limit"] == 1.5 and target["met"] == (target["ratio"] <= 1.5)


def test_a_resident_limit_below_the_batch_is_refused():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_serving.py"), "--quick", "--resident", "4", "--batch", "8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--resident (4) must be at least --batch (8)" in proc.stderr
