"""The bank-size study (`benchmarks/bank_study.py`): its leave-one-out banks, validation split and goal arithmetic,
and the whole study end to end at the smoke budget on the real assets (skipped with the install command when one is
missing), so the code path cannot rot."""

import json

import pytest
import torch
from benchmarks import data
from benchmarks.bank_study import (
    KINDS,
    MASKS,
    SMOKE_PLAN,
    BankStudy,
    bank_order,
    bank_topics,
    choose_lr,
    goals,
    render_readme_block,
    run_bank_study,
    split_validation,
)
from benchmarks.evaluate import RESULTS, SMOKE
from benchmarks.profiles import bank_only_topics, usable_topics

README = RESULTS.parent / "README.md"


def test_banks_leave_the_topic_out_and_follow_the_fixed_order():
    usable = [f"t{i}" for i in range(6)]  # largest first
    order = bank_order(usable, 2)
    assert order == ["t2", "t3", "t4", "t5", "t0", "t1"]
    assert bank_topics(order, "t0", 1) == ["t2"]
    assert bank_topics(order, "t0", 5) == ["t2", "t3", "t4", "t5", "t1"]
    assert bank_topics(order, "t1", 5) == ["t2", "t3", "t4", "t5", "t0"]
    for topic in ("t0", "t1"):
        for k in range(1, 6):
            bank = bank_topics(order, topic, k)
            assert topic not in bank and len(bank) == k
            assert bank == bank_topics(order, topic, 5)[:k]  # a larger bank extends a smaller one


def test_bank_only_topics_fill_banks_before_the_evaluation_topics():
    usable = [f"t{i}" for i in range(6)]
    order = bank_order(usable, 2, ["b0"])
    assert order == ["t2", "t3", "t4", "t5", "b0", "t0", "t1"]
    assert bank_topics(order, "t0", 4) == bank_topics(bank_order(usable, 2), "t0", 4)  # small banks unchanged
    assert bank_topics(order, "t0", 6) == ["t2", "t3", "t4", "t5", "b0", "t1"]


def test_a_topic_with_training_pairs_but_no_test_set_is_bank_only():
    def pairs(n, tag):
        return [(f"{tag} q{i}", f"{tag} a{i}") for i in range(n)]

    topics = {
        "big": {"train": pairs(30, "big"), "test": pairs(5, "big")},
        "no_test": {"train": pairs(18, "nt"), "test": pairs(1, "nt")},
        "repeats": {"train": pairs(1, "r") * 40, "test": pairs(1, "r")},  # 40 pairs, 1 distinct: too few
        "tiny": {"train": pairs(6, "ti"), "test": pairs(2, "ti")},
    }
    assert usable_topics(topics) == ["big"]
    assert bank_only_topics(topics) == ["no_test"]


def test_a_cached_run_of_another_bank_is_computed_again(tmp_path):
    study = object.__new__(BankStudy)  # only the cache: no model, no data
    study.cache, study.computed, study.reused = tmp_path, 0, 0
    first = study.cached("xpeft lora soft K=2", lambda: {"bank_topics": ["a", "b"], "accuracy": 0.5})
    same = study.cached("xpeft lora soft K=2", lambda: pytest.fail("recomputed"), {"bank_topics": ["a", "b"]})
    assert same == first and (study.computed, study.reused) == (1, 1)
    other = study.cached(
        "xpeft lora soft K=2", lambda: {"bank_topics": ["a", "c"], "accuracy": 0.7}, {"bank_topics": ["a", "c"]}
    )
    assert other["accuracy"] == 0.7 and study.computed == 2
    assert study.cached("xpeft lora soft K=2", lambda: pytest.fail("recomputed"))["bank_topics"] == ["a", "c"]


def test_validation_split_holds_out_whole_prompts():
    triples = [(f"p{i % 7}", f"a{i}", i % 2) for i in range(40)]
    train, held = split_validation(triples, 0.2, seed=0, topic="x")
    assert sorted(train + held) == sorted(triples)
    assert not {p for p, _, _ in train} & {p for p, _, _ in held}
    assert len(held) >= 0.2 * len(triples) and train
    assert split_validation(triples, 0.2, seed=0, topic="x") == (train, held)
    assert split_validation(triples, 0.2, seed=1, topic="x") != (train, held)


def test_goals_measure_the_gap_to_lora_in_points():
    baselines = [{"method": "LoRA r=8", "accuracy": 0.80}, {"method": "head only", "accuracy": 0.5}]
    rows = [
        {"kind": "lora", "mask": "soft", "K": 4, "accuracy": 0.78, "saved_bytes_masks": 900, "saved_bytes_with_head": 4000},
        {"kind": "lora", "mask": "soft", "K": 16, "accuracy": 0.70, "saved_bytes_masks": 1500, "saved_bytes_with_head": 4600},
        {"kind": "bottleneck", "mask": "hard", "K": 16, "accuracy": 0.76, "saved_bytes_masks": 110, "saved_bytes_with_head": 3200},
    ]  # fmt: skip
    soft_ok, soft_far, hard = goals(rows, baselines)
    assert soft_ok["points_below_lora"] == pytest.approx(2.0) and soft_ok["accuracy_met"] and soft_ok["bytes_met"]
    assert soft_far["points_below_lora"] == pytest.approx(10.0) and not soft_far["accuracy_met"]
    assert soft_far["accuracy_missed_by_points"] == pytest.approx(7.0)
    assert not soft_far["bytes_met"] and soft_far["bytes_over"] == 1500 - 1024
    assert hard["points_below_lora"] == pytest.approx(4.0) and hard["accuracy_met"]  # hard masks may be 5 points off


def test_mask_lr_is_the_best_validation_accuracy_then_the_lower_loss():
    sweep = [
        {"lr": 0.03, "validation_accuracy": 0.70, "validation_loss": 0.50},
        {"lr": 0.1, "validation_accuracy": 0.75, "validation_loss": 0.60},
        {"lr": 0.3, "validation_accuracy": 0.75, "validation_loss": 0.55},
    ]
    assert choose_lr(sweep) == 0.3
    sweep[2]["validation_accuracy"] = 0.74
    assert choose_lr(sweep) == 0.1


def test_readme_block_is_rendered_from_the_committed_json():
    path = RESULTS / "bank_size.json"
    if not path.is_file():
        pytest.skip("no committed bank_size.json")
    block = render_readme_block(json.loads(path.read_text()))
    assert block in README.read_text(), "regenerate it: python -m benchmarks.bank_study --readme benchmarks/README.md"


def _assets_or_skip():
    try:
        data.minilm_path()
        data.chatterbot()
    except data.MissingAssetError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_smoke_study_writes_every_row_and_reuses_its_cache(tmp_path):
    _assets_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_bank_study(SMOKE, SMOKE_PLAN, data.DEFAULT_SEED, tmp_path, True, "test", cache=tmp_path / "cache")
        again = run_bank_study(SMOKE, SMOKE_PLAN, data.DEFAULT_SEED, tmp_path, True, "again", cache=tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "bank_size_smoke.json").read_text())
    assert saved["complete"] and saved["run"]["command"] == "again"
    meta = saved["meta"]
    assert meta["bank_sizes"] == [1, 2] and len(meta["eval_topics"]) == 2
    assert {(r["kind"], r["mask"], r["K"]) for r in saved["rows"]} == {
        (kind, mask, k) for kind in KINDS for mask in MASKS for k in (1, 2)
    }
    assert [b["method"] for b in saved["baselines"]] == ["LoRA r=8", "dedicated adapter", "head only"]
    for row in saved["rows"] + saved["baselines"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["trainable_params"] > 0
        assert [p["topic"] for p in row["per_topic"]] == meta["eval_topics"]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in row["per_topic"])
    for row in saved["rows"]:
        assert 0 < row["payload_bytes"] < row["saved_bytes_masks"] < row["saved_bytes_with_head"]
        for p in row["per_topic"]:
            assert p["topic"] not in p["bank"] and len(p["bank"]) == row["K"]
    for choice in saved["mask_lr"]:
        assert choice["swept"] and choice["chosen_lr"] in SMOKE_PLAN.mask_lrs and choice["K"] == 2
        assert [s["lr"] for s in choice["sweep"]] == list(SMOKE_PLAN.mask_lrs)
    assert len(saved["goals"]) == len(saved["rows"])
    # The second call trained nothing and found the same numbers.
    assert res["run"]["runs_computed"] > 0 and again["run"]["runs_computed"] == 0
    assert again["rows"] == res["rows"] and again["baselines"] == res["baselines"]
    md = (tmp_path / "bank_size_smoke.md").read_text()
    assert "| X-PEFT | lora | hard | 2 |" in md and "| LoRA r=8 |" in md
    assert (tmp_path / "bank_size_smoke.png").stat().st_size > 1000
