"""The ETHER benchmarks end to end in --quick mode, so that they cannot rot (the figures are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--cycles", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_linear_benchmark_reports_every_method_and_target(tmp_path):
    report = run_quick("bench_ether.py", tmp_path / "ether.json", "--slow-steps", "1")
    assert {"lora_r8", "oft", "boft", "hra_r1", "ether", "ether_plus"} <= set(report["results"])
    assert all(r["step_s_median"] > 0 for r in report["results"].values())
    target = report["targets"]["ether_plus no slower than oft"]
    low, high = target["interval_95"]
    assert low <= target["ratio"] <= high and target["verdict"] in {"MET", "LEVEL", "MISSED"}


def test_ratio_interval_brackets_the_median_and_verdicts_tell_noise_from_a_miss():
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_ether import same_cycle_ratio, same_cycle_ratio_interval, verdict

    times = {"a": [1.0, 1.1, 0.9, 1.05, 1.0, 0.98], "b": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
    low, high = same_cycle_ratio_interval(times, "a", "b")
    assert 0.9 <= low <= same_cycle_ratio(times, "a", "b") <= high <= 1.1
    assert same_cycle_ratio_interval({"a": [2.0] * 4, "b": [1.0] * 4}, "a", "b") == (2.0, 2.0)
    assert verdict(0.99, (0.97, 1.01), 1.0) == "MET"
    assert verdict(1.01, (0.99, 1.03), 1.0) == "LEVEL"
    assert verdict(1.04, (1.02, 1.06), 1.0) == "MISSED"
    assert verdict(1.04, None, 1.0) == "MISSED"


@pytest.mark.slow
def test_ablation_reports_each_special_path_on_and_off(tmp_path):
    report = run_quick("bench_ether.py", tmp_path / "paths.json", "--ablation")
    assert {pair["path"] for pair in report["special_paths"].values()} == {"block_update", "two_sided_linear", "both"}
    assert all(pair["step_time_off_over_on"] > 0 for pair in report["special_paths"].values())
    assert "ether_plus-plain_all" in report["results"]


@pytest.mark.slow
def test_conv_benchmark_reports_ratios_against_peft_baselines(tmp_path):
    report = run_quick("bench_ether_conv.py", tmp_path / "conv.json")
    assert set(report["results"]) == {"lora_r8", "oft", "hra_r8", "full_ft", "ether", "ether_plus"}
    assert report["results"]["ether"]["trainable_params"] < report["results"]["lora_r8"]["trainable_params"]
    assert {"ether/lora_r8", "ether_plus/oft", "ether_plus/hra_r8"} <= set(report["ratios"])
