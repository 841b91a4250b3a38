"""The random-bank sweep (benchmarks/random_bank.py) end to end with a tiny budget, so that its code path cannot rot
(the figures are not checked). Needs the evaluation assets; skipped with the install command when one is missing."""

import json

import pytest
from benchmarks import data, random_bank


@pytest.mark.slow
def test_smoke_sweep_writes_every_row_with_its_settings_and_run_metadata(tmp_path):
    try:
        data.minilm_path(), data.spam_assassin(), data.chatterbot()
    except data.MissingAssetError as err:
        pytest.skip(str(err))
    random_bank.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--cached-heads", "0.1", "--with-defaults"])
    res = json.loads((tmp_path / "random_bank_smoke.json").read_text())
    run = res["meta"]["runs"][0]
    assert {"command", "git_commit", "load_average", "torch_threads", "seconds"} <= set(run)
    spam = res["spam"]
    assert {"head lr=0.1", "adapter lr=0.001", "xpeft hard k=1 scale=10 lr=0.1", "head_cached lr=0.1"} <= set(spam)
    scaled = spam["xpeft hard k=1 scale=10 lr=0.1"]
    assert (scaled["scale"], scaled["hard_k"], scaled["steps"]) == (10.0, 1, 3)
    assert scaled["init_residual_ratio"] > 0 and 0 <= scaled["accuracy"] <= 1
    defaults = [r for r in spam.values() if r["default"]]
    assert {r["mask_type"] for r in defaults} == {"soft", "hard"}
    assert res["topics"] and all(len(r["per_topic"]) == 1 for r in res["topics"].values())
    assert "| X-PEFT hard k=1, scale 10 |" in (tmp_path / "random_bank_smoke.md").read_text()
