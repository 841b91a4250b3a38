"""`benchmarks/bench_pedro_beams.py` end to end in --quick mode, so that it cannot rot (the figures are not checked)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_beam_benchmark_reports_throughput_memory_and_ratios_per_beam_width():
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_pedro_beams import MODELS, main

    report = main(["--quick", "--beams", "1", "3"])
    assert set(report["beams"]) == {"1", "3"}
    for section in report["beams"].values():
        assert set(section["timing"]) == set(section["memory"]) == set(MODELS)
        assert all(t["decode_tokens_per_cpu_s"] > 0 and t["decode_steps_timed"] > 0 for t in section["timing"].values())
        assert all(m["peak_rss_mb"] > 0 for m in section["memory"].values())
        assert section["ratios"]["pedro_over_lora_throughput_cpu"] > 0
    assert report["setup"]["quick"] and report["machine"]["cpu_count"]
