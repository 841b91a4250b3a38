"""The evaluation runner end to end in --smoke mode (a few steps per method) on the real assets, so it cannot rot.

Needs the evaluation assets (see benchmarks/data.py); skipped with the install command when one is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import data
from benchmarks.evaluate import TASK_NAMES

REPO = Path(__file__).resolve().parents[1]


def _assets_or_skip():
    try:
        data.minilm_path()
        data.chatterbot()
        data.spam_assassin()
        data.smollm2_path()  # converts the GGUF once (about a minute) if the cache is empty
    except data.MissingAssetError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_smoke_run_writes_json_markdown_and_plots(tmp_path):
    _assets_or_skip()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    # Two processes: covers the task code (in the children) and the parallel run and merge (in the parent).
    cmd = [sys.executable, "-m", "benchmarks.evaluate", "--smoke", "--jobs", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "eval_smoke.json").read_text())
    assert res["meta"]["smoke"] is True
    spam = {r["method"] for r in res["spam"]["rows"]}
    assert {"head only", "full FT", "LoRA r=8", "IA3", "HRA r=8"} <= spam
    # every xpeft method in the installed package has a row (or an explained skip), none silently missing
    expected = {
        "EtherConfig": ["ETHER", "ETHER+"],
        "XPeftConfig": ["X-PEFT soft", "X-PEFT hard"],
        "PedroConfig": ["PEDRO"],
    }
    skipped = {s["method"] for s in res["spam"]["skipped"]}
    for cls, names in expected.items():
        for name in names:
            assert name in (spam if cls in res["meta"]["xpeft_methods"] else skipped), (name, res["spam"]["skipped"])
    for row in res["spam"]["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["trainable_params"] > 0 and row["saved_bytes"] > 0
        assert len(row["losses"]) == res["meta"]["budget"]["cls_steps"]
    assert set(res["spam"]["lr_sweep"]) >= {"LoRA r=8"}
    instruct = {r["method"] for r in res["instruct"]["rows"]}
    assert {"base (no tuning)", "IA3", "LoRA r=8"} <= instruct
    assert all(t["tokens_per_s"] > 0 for t in res["instruct"]["throughput"])
    assert len(res["profiles"]["rows"]) == 4
    assert {res[t]["run"]["command"].split("--tasks ")[1].split()[0] for t in TASK_NAMES} == {
        "spam",
        "instruct,profiles",
    }
    md = (tmp_path / "eval_smoke.md").read_text()
    assert "| LoRA r=8 |" in md and "SMOKE" in md
    for png in res["meta"]["plots"]:
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.slow
def test_ether_quality_study_runs_in_two_workers_and_resumes(tmp_path):
    """The study's CLI end to end in --smoke mode: two worker processes share one results file, the phase-2 runs
    follow from phase 1, and a second call finds nothing left to run."""
    _assets_or_skip()
    from benchmarks.evaluate import QUALITY_SMOKE, quality_pending

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    cmd = [sys.executable, "-m", "benchmarks.evaluate", "--tasks", "ether_quality", "--smoke", "--jobs", "2"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "ether_quality_smoke.json").read_text())
    runs = res["runs"]
    assert quality_pending(QUALITY_SMOKE, runs) == []
    assert {"LoRA r=8 q,v lr=0.001", "ETHER+ q,v lr=0.01 n_blocks=32", "ETHER q,v lr=0.03 n_blocks=32"} <= set(runs)
    assert any(r["n_blocks"] == 4 for r in runs.values())  # phase 2 ran
    assert all("error" not in r and r["answer_ppl"] > 1 for r in runs.values())
    assert {r["run"]["pid"] for r in runs.values()} and len({r["run"]["pid"] for r in runs.values()}) >= 2
    assert "| ETHER+ | q,v | 0.01 | 32 | – |" in (tmp_path / "ether_quality_smoke.md").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((tmp_path / "ether_quality_smoke.json").read_text())["runs"] == runs


def test_methods_reruns_only_the_named_spam_rows_and_keeps_the_others(tmp_path):
    _assets_or_skip()
    from dataclasses import asdict

    from benchmarks.evaluate import SMOKE, XPEFT_MASK_LR, main

    row = {"f1": 0.1, "losses": [0.7], "final_loss": 0.7, "diverged": False, "train_seconds": 1.0, "saved_bytes": 8}
    kept = {
        **row,
        "method": "head only",
        "family": "reference",
        "lr": 0.01,
        "accuracy": 0.123,
        "trainable_params": 770,
    }
    kept["saved_bytes_excl_head"] = 0
    stale = {**row, "method": "X-PEFT hard", "family": "xpeft", "lr": 0.01, "accuracy": 0.5, "trainable_params": 1}
    old_run = {"command": "the first run", "started_utc": "2026-01-01T00:00:00Z", "seconds": 1.0, "torch_threads": 1}
    old_run.update(load_average_start=[0.0], load_average_end=[0.0], git_commit="abc")
    previous = {
        "meta": {"smoke": True, "seed": data.DEFAULT_SEED, "budget": asdict(SMOKE)},
        "spam": {
            "model": "all-MiniLM-L6-v2",
            "data": {"train": 64, "test": 32, "max_len": 16},
            "rows": [kept, stale],
            "lr_sweep": {},
            "skipped": [],
            "run": old_run,
        },
    }
    merged = tmp_path / "previous.json"
    merged.write_text(json.dumps(previous))
    with pytest.raises(SystemExit):  # the other rows must come from somewhere
        main(["--smoke", "--tasks", "spam", "--methods", "X-PEFT hard", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(
            [
                "--smoke",
                "--tasks",
                "spam",
                "--methods",
                "X-PEFT medium",
                "--merge",
                str(merged),
                "--out",
                str(tmp_path),
            ]
        )
    res = main(
        ["--smoke", "--tasks", "spam", "--methods", "X-PEFT hard", "--merge", str(merged), "--out", str(tmp_path)]
    )
    spam = json.loads((tmp_path / "eval_smoke.json").read_text())["spam"]
    assert spam == json.loads(json.dumps(res["spam"]))
    assert [r["method"] for r in spam["rows"]] == ["head only", "X-PEFT hard"]
    assert spam["rows"][0] == kept and spam["run"] == old_run
    fresh = spam["rows"][1]
    assert fresh["lr"] == XPEFT_MASK_LR and fresh["trainable_params"] > 1 and len(fresh["losses"]) == SMOKE.cls_steps
    assert [r["methods"] for r in spam["reruns"]] == [["X-PEFT hard"]] and spam["reruns"][0]["seconds"] > 0
    assert "Rows X-PEFT hard run again" in (tmp_path / "eval_smoke.md").read_text()
