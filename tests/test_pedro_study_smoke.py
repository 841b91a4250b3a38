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


def test_best_lr_orders_and_summary_from_a_synthetic_file():
    """Without training: the grid's best lr is picked by perplexity, extra batch orders are added only once the
    grid is complete, and the summary averages them."""
    meta = {"budgets": {"matched_rank": 4}, "lm_steps": [40, 160], "cls_steps": 100}
    rows = pedro_study.study_rows(4, (40, 160), 100)
    assert not any(r.order for r in rows), "orders before the grid is complete"
    lora_grid = [r for r in rows if r.label == "LoRA r=8" and r.steps == 40]
    assert sorted(r.lr for r in lora_grid) == sorted(pedro_study.LR_GRID)
    done = {r.key: {"answer_ppl": 20.0 - 1000 * r.lr, "trainable_params": 1} for r in rows if r.group == "matched"}
    done["instruct|LoRA r=8|40|0.003|"]["answer_ppl"] = 5.0  # LoRA's best: 3e-3 (the others: the largest lr)
    rows = pedro_study.study_rows(4, (40, 160), 100, done)
    orders = [r for r in rows if r.order]
    assert {(r.label, r.lr) for r in orders if r.label == "LoRA r=8"} == {("LoRA r=8", 0.003)}
    assert len(orders) == 5 * (pedro_study.ORDERS - 1) and len({r.key for r in orders}) == len(orders)
    for k, row in enumerate(r for r in orders if r.label == "LoRA r=8"):
        done[row.key] = {"answer_ppl": 6.0 + k, "trainable_params": 1}
    summary = {s["label"]: s for s in pedro_study.matched_summary({"meta": meta, "rows": done})}
    lora = summary["LoRA r=8"]
    assert lora["lr"] == 0.003 and lora["orders"] == [5.0, 6.0, 7.0] and lora["short"] == 6.0
    assert lora["long_lr"] == 1e-3 and lora["long"] == 20.0 - 1000 * 1e-3
    assert summary["IA3"]["lr"] == 1e-2 and summary["IA3"]["orders"] == [20.0 - 10]
