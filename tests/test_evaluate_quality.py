"""The ETHER quality study's bookkeeping (which runs come next, summary, report, refusals) and its init measurement;
no pretrained model needed."""

import json
import math

import pytest
import torch
from benchmarks import evaluate
from benchmarks.evaluate import QualityGrid, QualityRun, quality_pending
from peft import get_peft_model

import xpeft

GRID = QualityGrid(lora_lrs=(1e-3,), ether_lrs=(3e-3, 1e-2, 3e-2), block_counts=(4,), targets=("q,v",))


def _row(run: QualityRun, ppl: float | None) -> dict:
    row = {"key": run.key, "method": run.method, "targets": run.targets, "lr": run.lr, "n_blocks": run.n_blocks}
    if ppl is None:
        return row | {"error": "RuntimeError: boom"}
    row |= {"answer_loss": math.log(ppl), "answer_ppl": ppl, "trainable_params": 7, "train_seconds": 3.0}
    return row | {"run": {"load_average_start": [2.0, 2.0, 2.0]}}


def _done(*rows) -> dict:
    return {r["key"]: r for r in rows}


def _sweep(variant, ppls: dict) -> list[dict]:
    return [_row(QualityRun(variant, "q,v", lr, 32), p) for lr, p in ppls.items()]


def test_phase_one_runs_lora_then_etherplus_from_the_middle_of_the_grid():
    keys = [r.key for r in quality_pending(GRID, {})]
    assert keys[:4] == [
        "LoRA r=8 q,v lr=0.001",
        "ETHER+ q,v lr=0.01 n_blocks=32",
        "ETHER+ q,v lr=0.03 n_blocks=32",
        "ETHER+ q,v lr=0.003 n_blocks=32",
    ]
    assert len(keys) == 7 and all("n_blocks=4" not in k for k in keys)  # no phase 2 before a sweep is complete


def test_block_counts_follow_at_the_best_lr_once_the_sweep_is_done():
    rows = _sweep("ETHER+", {3e-3: 30.0, 1e-2: 20.0, 3e-2: 25.0})
    keys = [r.key for r in quality_pending(GRID, _done(*rows))]
    assert "ETHER+ q,v lr=0.01 n_blocks=4" in keys
    assert not any(k.startswith("ETHER+") and "n_blocks=32" in k for k in keys)
    assert not any(k.startswith("ETHER q,v") and "n_blocks=4" in k for k in keys)  # ETHER's sweep is not done


def test_a_winning_edge_extends_the_sweep_before_the_block_counts():
    rows = _sweep("ETHER+", {3e-3: 30.0, 1e-2: 25.0, 3e-2: 20.0})
    keys = [r.key for r in quality_pending(GRID, _done(*rows))]
    assert "ETHER+ q,v lr=0.1 n_blocks=32" in keys and not any("n_blocks=4" in k for k in keys)
    worse = _row(QualityRun("ETHER+", "q,v", 0.1, 32), 40.0)
    keys = [r.key for r in quality_pending(GRID, _done(*rows, worse))]
    assert "ETHER+ q,v lr=0.03 n_blocks=4" in keys  # back at the best lr
    better = _row(QualityRun("ETHER+", "q,v", 0.1, 32), 15.0)
    keys = [r.key for r in quality_pending(GRID, _done(*rows, better))]
    assert "ETHER+ q,v lr=0.3 n_blocks=32" in keys and not any("n_blocks=4" in k for k in keys)


def test_a_winning_bottom_extends_the_sweep_downwards_for_lora_too():
    rows = _sweep("ETHER+", {3e-3: 20.0, 1e-2: 25.0, 3e-2: 30.0})
    lora = _row(QualityRun("LoRA r=8", "q,v", 1e-3), 16.0)
    keys = [r.key for r in quality_pending(GRID, _done(*rows, lora))]
    assert "ETHER+ q,v lr=0.001 n_blocks=32" in keys and not any("n_blocks=4" in k for k in keys)
    assert "LoRA r=8 q,v lr=0.0003" not in keys  # a one-point sweep has no end to extend
    grid = QualityGrid(lora_lrs=(1e-3, 3e-3), ether_lrs=GRID.ether_lrs, block_counts=(4,), targets=("q,v",))
    lora2 = _row(QualityRun("LoRA r=8", "q,v", 3e-3), 18.0)
    keys = [r.key for r in quality_pending(grid, _done(*rows, lora, lora2))]
    assert "LoRA r=8 q,v lr=0.0003" in keys
    inside = _row(QualityRun("LoRA r=8", "q,v", 3e-4), 17.0)
    assert not any(k.startswith("LoRA") for k in (r.key for r in quality_pending(grid, _done(lora, lora2, inside))))


def test_a_failed_run_is_done_and_never_the_best():
    rows = _sweep("ETHER+", {3e-3: 30.0, 1e-2: 25.0, 3e-2: None})
    keys = [r.key for r in quality_pending(GRID, _done(*rows))]
    assert "ETHER+ q,v lr=0.03 n_blocks=32" not in keys  # not retried
    assert "ETHER+ q,v lr=0.01 n_blocks=4" in keys


@pytest.mark.parametrize(("lr", "expected"), [(1e-3, 3e-3), (3e-3, 1e-2), (1e-2, 3e-2), (3e-2, 0.1), (0.1, 0.3)])
def test_next_lr_walks_a_one_three_ten_grid(lr, expected):
    assert evaluate._next_lr(lr) == pytest.approx(expected)
    assert evaluate._next_lr(expected, down=True) == pytest.approx(lr)


def test_summary_compares_each_method_with_the_best_lora_on_the_same_targets():
    lora = [_row(QualityRun("LoRA r=8", "q,v", lr), p) for lr, p in ((1e-3, 16.0), (3e-3, 14.0))]
    rows = _done(*lora, *_sweep("ETHER+", {1e-2: 15.0, 3e-2: 16.0}), *_sweep("ETHER", {1e-2: 30.0}))
    by = {s["method"]: s for s in evaluate.quality_summary(rows)}
    assert by["ETHER+"]["best"] == "ETHER+ q,v lr=0.01 n_blocks=32"
    assert by["ETHER+"]["ratio_to_lora"] == pytest.approx(15 / 14) and by["ETHER+"]["within_10_percent"]
    assert by["ETHER"]["ratio_to_lora"] == pytest.approx(30 / 14) and not by["ETHER"]["within_10_percent"]


def test_report_lists_every_run_and_the_summary(tmp_path):
    rows = _sweep("ETHER", {1e-2: 30.0, 3e-2: None})
    rows[0]["initial_answer_loss"] = 8.0
    runs = _done(_row(QualityRun("LoRA r=8", "q,v", 1e-3), 16.0), *rows)
    meta = evaluate._quality_meta(evaluate.SMOKE, GRID, 0, "cmd")
    meta["data"] = {"train_pairs": 10, "test_pairs": 4}
    path = tmp_path / "ether_quality.json"
    evaluate._quality_write({"meta": meta, "runs": runs}, path)
    md = path.with_suffix(".md").read_text()
    assert "| ETHER | q,v | ETHER q,v lr=0.01 n_blocks=32 | 30.00 | 1.88 |" in md
    assert "| LoRA r=8 | q,v | 0.001 | – | – | 2.773 | 16.00 | 7 | 3 | 2.0 |" in md
    assert "| ETHER | q,v | 0.01 | 32 | 8.000 | 3.401 | 30.00 | 7 | 3 | 2.0 |" in md
    assert "| ETHER | q,v | 0.03 | 32 | failed: RuntimeError: boom" in md
    assert json.loads(path.read_text())["runs"] == runs


def test_a_results_file_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "ether_quality.json"
    meta = evaluate._quality_meta(evaluate.SMOKE, GRID, 0, "cmd")
    path.write_text(json.dumps({"meta": meta, "runs": _done(_row(QualityRun("LoRA r=8", "q,v", 1e-3), 16.0))}))
    assert evaluate._quality_read(path, meta)["runs"]
    other = evaluate._quality_meta(evaluate.FULL, GRID, 0, "cmd")
    with pytest.raises(SystemExit, match="another budget, seed or grid; move it away .* to start a new study"):
        evaluate._quality_read(path, other)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.q(x)


@pytest.mark.parametrize("variant", ["ether", "ether_plus"])
def test_layer_output_change_is_the_reflection_through_the_weight(variant):
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), xpeft.EtherConfig(target_modules=["q"], n_blocks=2, variant=variant))
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    (found,) = evaluate.layer_output_change(model, {"x": x}, mask)
    layer = model.base_model.model.q
    if variant == "ether_plus":
        assert found["relative_change"] == pytest.approx(0.0, abs=1e-6)  # v = -u: the identity
        return
    u = layer.ether_u["default"].detach()
    u = u / u.norm(dim=-1, keepdim=True)  # [2 blocks, 4]
    xb = x.reshape(2, 5, 2, 4)
    hx = (xb - 2 * u * (xb * u).sum(-1, keepdim=True)).reshape(2, 5, 8)  # H x, block by block, written out
    w, keep = layer.base_layer.weight.detach(), mask.bool()
    expected = ((hx - x) @ w.T)[keep].norm() / (x @ w.T)[keep].norm()
    assert found["relative_change"] == pytest.approx(float(expected), rel=1e-5)
    assert found["in_features"] == 8 and found["layer"].endswith("q")
