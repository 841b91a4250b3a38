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
    assert "ether_plus no slower than oft" in report["targets"]


@pytest.mark.slow
def test_conv_benchmark_reports_ratios_against_peft_baselines(tmp_path):
    report = run_quick("bench_ether_conv.py", tmp_path / "conv.json")
    assert set(report["results"]) == {"lora_r8", "oft", "hra_r8", "full_ft", "ether", "ether_plus"}
    assert report["results"]["ether"]["trainable_params"] < report["results"]["lora_r8"]["trainable_params"]
    assert {"ether/lora_r8", "ether_plus/oft", "ether_plus/hra_r8"} <= set(report["ratios"])
