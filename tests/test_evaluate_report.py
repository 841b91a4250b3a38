"""Pieces of the evaluation runner that need no model: batch order, test subsets, report rendering, section merging."""

import json
import re
from dataclasses import asdict

import pytest
import torch
from benchmarks import evaluate, training


def test_batches_are_deterministic_epochs():
    first = torch.cat(list(training.batches(10, 4, 5, seed=0)))
    again = torch.cat(list(training.batches(10, 4, 5, seed=0)))
    assert torch.equal(first, again)
    # 20 indices = two full epochs: each index exactly twice
    assert torch.bincount(first, minlength=10).tolist() == [2] * 10
    assert not torch.equal(first, torch.cat(list(training.batches(10, 4, 5, seed=1))))


def test_test_subset_keeps_the_spam_ratio():
    pairs = [(f"m{i}", int(i % 4 == 0)) for i in range(400)]  # 25 % spam
    sub = evaluate._test_subset(pairs, 40, seed=0)
    assert len(sub) == 40 and sum(y for _, y in sub) == 10
    assert sub == evaluate._test_subset(pairs, 40, seed=0)


def test_f1_accuracy_against_hand_counts():
    pred = torch.tensor([1, 1, 0, 0, 1])
    labels = torch.tensor([1, 0, 0, 1, 1])
    out = training.f1_accuracy(pred, labels)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp=2, fp=1, fn=1


def _fake(task_rows, tasks_run):
    res = {
        "meta": {
            "command": "x", "smoke": True, "prefix": "eval_smoke", "seed": 0, "budget": asdict(evaluate.SMOKE),
            "machine": {"torch": "t", "transformers": "t", "peft": "p", "cpu_count": 2, "git_commit": "abc"},
            "tasks_run": tasks_run,
        }
    }  # fmt: skip
    run = {"command": "x", "started_utc": "now", "seconds": 1.0, "load_average_start": [1.0] * 3}
    run.update({"load_average_end": [1.0] * 3, "torch_threads": 1, "git_commit": "abc"})
    if "spam" in task_rows:
        row = {"method": "LoRA r=8", "family": "peft", "lr": 1e-3, "accuracy": 0.9, "f1": 0.8, "trainable_params": 10}
        row.update({"saved_bytes": 2000, "saved_bytes_excl_head": 1000, "train_seconds": 1.0})
        sweep = {"LoRA r=8": [{"lr": 1e-3, "accuracy": 0.9, "f1": 0.8, "final_loss": 0.1, "diverged": False}]}
        res["spam"] = {"model": "m", "data": {"train": 1, "test": 1, "max_len": 1}, "rows": [row], "lr_sweep": sweep}
        res["spam"].update({"skipped": [{"method": "PEDRO", "reason": "missing"}], "run": run})
    if "instruct" in task_rows:
        row = {"method": "LoRA r=8", "family": "peft", "lr": 1e-3, "answer_loss": 2.0, "answer_ppl": 7.39}
        row.update({"trainable_params": 10, "saved_bytes": 2000, "train_seconds": 1.0})
        throughput = [
            {"method": "base (no adapter)", "tokens_per_s": 10.0},
            {"method": "LoRA r=8", "tokens_per_s": 8.0, "mixed_tokens_per_s": 5.0, "base_tokens_per_s": 10.0},
            {"method": "IA3", "tokens_per_s": 9.0, "mixed_error": "not supported", "base_tokens_per_s": 12.0},
        ]
        generations = {"prompts": ["hi"], "reference": ["hello"], "outputs": {"LoRA r=8": ["hey"]}}
        res["instruct"] = {"model": "m", "data": {"train_pairs": 1, "test_pairs": 1, "max_len": 1}, "rows": [row]}
        res["instruct"].update({"generations": generations, "throughput": throughput, "tenants": ["a", "b"]})
        res["instruct"].update({"skipped": [], "run": run})
    if "profiles" in task_rows:
        row = {
            "method": "X-PEFT hard (trained bank)",
            "accuracy": 0.7,
            "saved_bytes": 900,
            "saved_bytes_excl_head": 100,
        }
        res["profiles"] = {"setting": "s", "rows": [{**row, "trainable_params": 5}], "skipped": [], "run": run}
    return res


def test_report_renders_every_number_and_sections_merge(tmp_path):
    evaluate._write(_fake({"spam"}, ["spam"]), tmp_path, "eval_smoke")
    evaluate._write(_fake({"profiles"}, ["profiles"]), tmp_path, "eval_smoke")  # another run, another task
    res = json.loads((tmp_path / "eval_smoke.json").read_text())
    assert {"spam", "profiles"} <= set(res)
    md = (tmp_path / "eval_smoke.md").read_text()
    assert "| LoRA r=8 | 0.001 | 0.9000 | 0.8000 | 10 | 2.0 KB (1.0 KB) | 1.0 |" in md
    assert "| X-PEFT hard (trained bank) | 0.7000 | 900 B (100 B) | 5 |" in md
    assert "Not run: PEDRO: missing" in md
    # a results file with other settings is never mixed in
    other = _fake({"spam"}, ["spam"])
    other["meta"]["budget"]["cls_steps"] = 999
    other["spam"]["rows"][0]["accuracy"] = 0.1
    out2 = tmp_path / "other"
    out2.mkdir()
    (out2 / "eval_smoke.json").write_text(json.dumps(other))
    evaluate._write(_fake({"profiles"}, ["profiles"]), out2, "eval_smoke")
    assert "spam" not in json.loads((out2 / "eval_smoke.json").read_text())


def test_readme_block_is_replaced_from_the_results(tmp_path):
    res = evaluate._write(_fake({"spam", "profiles"}, ["spam", "profiles"]), tmp_path, "eval_smoke")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{evaluate.README_BEGIN}\nold numbers\n{evaluate.README_END}\nlimits\n")
    evaluate.update_readme(readme, res)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nlimits\n") and "old numbers" not in text
    assert "| LoRA r=8 | 0.001 | 0.9000 | 0.8000 | 10 | 2.0 KB (1.0 KB) | 1.0 |" in text
    assert "### Many profiles (s)" in text  # one heading level below the report's
    evaluate.update_readme(readme, res)
    assert readme.read_text() == text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="has no <!-- evaluate:begin --> ... <!-- evaluate:end --> block"):
        evaluate.update_readme(readme, res)


def test_readme_results_are_those_of_the_committed_json():
    """Every number of benchmarks/README.md's evaluation block is traceable: it is exactly what the committed JSON renders to."""
    from pathlib import Path

    root = Path(evaluate.__file__).resolve().parent.parent
    text = (root / "benchmarks" / "README.md").read_text()
    start = text.index(evaluate.README_BEGIN)
    block = text[start : text.index(evaluate.README_END) + len(evaluate.README_END)]
    source = re.search(r"from (benchmarks/results/[\w.]+\.json)", block.splitlines()[1]).group(1)
    res = json.loads((root / source).read_text())
    assert block == evaluate.render_readme_block(res)


def test_throughput_is_reported_against_the_base_run_timed_just_before(tmp_path):
    res = evaluate._write(_fake({"instruct"}, ["instruct"]), tmp_path, "eval_smoke")
    md = (tmp_path / "eval_smoke.md").read_text()
    assert "| base (no adapter) | 10.0 | – | – | – | – |" in md
    assert "| LoRA r=8 | 8.0 | 5.0 | 10.0 | 0.80 | 0.50 |" in md
    assert "| IA3 | 9.0 | not supported | 12.0 | 0.75 | – |" in md
    assert "- LoRA r=8: 'hey'" in md  # the report keeps the generations; the README block leaves them out
    assert "'hey'" not in evaluate.render_readme_block(res)


def test_topic_examples_are_balanced_and_share_no_prompt_across_splits_or_labels():
    from benchmarks.profiles import topic_examples

    topics = {
        "greetings": {"train": [("Hello", "Hi"), ("Hey", "Hello"), ("Hey", "Hello")], "test": [("Hi there", "Hi")]},
        "chat": {
            "train": [("How are you?", "Fine"), ("Hello", "Hi"), ("Bye", "See you")],
            "test": [("Hello", "Hi"), ("What's up?", "Not much"), ("Yo", "Yo"), ("Hey", "Hello")],
        },
        "tech": {
            "train": [(f"bug {i}", "fix") for i in range(6)],
            "test": [(f"crash {i}", "reboot") for i in range(6)],
        },
    }
    train = topic_examples(topics, "chat", "train", seed=0)
    test = topic_examples(topics, "chat", "test", seed=0, limit=4)
    for examples in (train, test):
        labels = [y for *_, y in examples]
        assert labels.count(1) == labels.count(0) > 0 and len(set(examples)) == len(examples)
    chat_prompts = {p for part in topics["chat"].values() for p, _ in part}
    assert not {p for p, _, y in train + test if y == 0} & chat_prompts  # "Hello" is in greetings too
    assert not {p for p, _, _ in test} & {p for t in topics.values() for p, _ in t["train"]}
    assert {p for p, _, y in test if y == 1} == {"What's up?", "Yo"}
    assert len(test) == 4 and test == topic_examples(topics, "chat", "test", seed=0, limit=4)
    # negatives are drawn round robin: both other topics contribute
    greetings_only = topic_examples({**topics, "tech": {"train": [], "test": []}}, "tech", "train", seed=0)
    assert greetings_only == []
    assert {p.split()[0] for p, _, y in topic_examples(topics, "greetings", "train", seed=0) if y == 0} >= {"bug"}


def test_parallel_jobs_balance_the_task_costs():
    assert evaluate.plan_jobs(["spam", "instruct", "profiles"], 2) == [["spam"], ["instruct", "profiles"]]
    assert evaluate.plan_jobs(["spam", "instruct", "profiles"], 5) == [["spam"], ["instruct"], ["profiles"]]
    assert evaluate.plan_jobs(["profiles"], 2) == [["profiles"]]


def test_sections_merge_when_the_budget_fields_they_read_agree(tmp_path):
    for folder, field, joins in (("unrelated", "lm_steps", True), ("related", "cls_len", False)):
        out = tmp_path / folder
        out.mkdir()
        evaluate._write(_fake({"spam"}, ["spam"]), out, "eval_smoke")
        profiles_run = _fake({"profiles"}, ["profiles"])
        profiles_run["meta"]["budget"][field] = 999  # lm_steps is not read by spam; cls_len is
        assert ("spam" in evaluate._write(profiles_run, out, "eval_smoke")) is joins
