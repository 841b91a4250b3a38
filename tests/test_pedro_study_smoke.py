"""The PEDRO study (benchmarks/pedro_study.py) end to end with a tiny budget, so that its code path cannot rot (the
figures are not checked). Needs the evaluation assets; skipped with the install command when one is missing."""

import json

import pytest
from benchmarks import data, pedro_study

ROWS = [
    "instruct|LoRA r=8|2|0.001|",
    "instruct|PEDRO|2|0.003|vg_rank=4",
    "instruct|PEDRO|2|0.003|generator_input=block",
    "spam|PEDRO|3|0.003|pooler=mean",
]


@pytest.mark.slow
def test_smoke_study_writes_rows_budgets_and_report_and_resumes(tmp_path):
    try:
        data.minilm_path(), data.smollm2_path(), data.spam_assassin(), data.chatterbot()
    except data.MissingAssetError as err:
        pytest.skip(str(err))
    args = ["--smoke", "--threads", "1", "--out", str(tmp_path), "--only", *ROWS]
    pedro_study.main(args[:-1])  # all rows but the last
    res = pedro_study.main(args)  # resumes: runs the last row only
    assert [run["command"].count("--only") for run in res["meta"]["runs"]] == [1, 1]
    assert sorted(res["rows"]) == sorted(ROWS)
    budgets = res["meta"]["budgets"]
    # The matched rank is the largest within LoRA r=8's count, on the real model: 432,480 <= 460,800 < 518,910.
    assert budgets["matched_rank"] == 4 and budgets["lora_r8"] == 460_800
    assert budgets["pedro_by_rank"]["4"] <= budgets["lora_r8"] < budgets["pedro_by_rank"]["5"]
    matched = res["rows"]["instruct|PEDRO|2|0.003|vg_rank=4"]
    assert matched["trainable_params"] == budgets["pedro_by_rank"]["4"] and matched["answer_ppl"] > 1
    assert res["rows"]["instruct|PEDRO|2|0.003|generator_input=block"]["pedro"] == {"generator_input": "block"}
    assert 0 <= res["rows"]["spam|PEDRO|3|0.003|pooler=mean"]["accuracy"] <= 1
    report = (tmp_path / "pedro_study_smoke.md").read_text()
    assert "| PEDRO r=4 (≤ LoRA r=8) | 432,480 |" in report and "| generator input: block input |" in report
    assert (tmp_path / "pedro_study_smoke.png").stat().st_size > 0
    assert json.loads((tmp_path / "pedro_study_smoke.json").read_text()) == res
