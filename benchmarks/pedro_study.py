"""PEDRO against LoRA r=8 and IA3 at matched parameter budgets, and what PEDRO's quality depends on (issue 19).

    python -m benchmarks.pedro_study --threads 1 [--only KEY ...] [--groups matched,ablation] [--smoke]
    python -m benchmarks.pedro_study --render        # pedro_study.md and .png from the JSON, no training

Task ``instruct`` (the evaluation's instruction task, ``benchmarks.evaluate``): SmolLM2-135M-Instruct on the
chatterbot pairs, 80 tokens, loss on the answer only, batch 4, the same batch order for every row; scored by the
held-out answer perplexity (PEDRO pools each test prompt only: the labels mark it). Task ``spam``: SpamAssassin on
all-MiniLM-L6-v2, the evaluation's splits, 100 steps of batch 16, scored by test accuracy.

Groups of rows:

- ``matched``: LoRA r=8 (q, v) and IA3 (peft's defaults) at 40 and 160 steps; PEDRO at the default `vg_rank` (12),
  at the largest `vg_rank` whose parameter count is at most LoRA r=8's (computed on the model, recorded in the JSON),
  and at `vg_rank=1`, its smallest, against IA3.
- ``ablation``: PEDRO's defaults with one thing changed (what the generator reads, pooler, zero-initialised up
  projection, activation, learning rate, rank), at 40 steps on ``instruct`` and 100 steps on ``spam``, with LoRA r=8 and IA3 measured in
  the same run.

Rows are written to ``<out>/pedro_study.json`` as they finish, under a file lock, so several processes (each with
its own ``--only`` list) share one file and a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402

from xpeft import PedroConfig  # noqa: E402

from . import data  # noqa: E402
from .evaluate import (  # noqa: E402
    FULL,
    SMOKE,
    Method,
    _test_subset,
    answer_loss,
    encode_chat,
    encode_cls,
    instruct_pairs,
    machine_info,
    run_spam_method,
)
from .training import set_threads, train_loop, trainable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEDRO_LR = 3e-3  # evaluate.py's PEDRO row
BASELINE_LRS = {"LoRA r=8": 1e-3, "IA3": 1e-2}  # evaluate.py's rows


@dataclass(frozen=True)
class Row:
    """One training run: a method on a task, for a number of steps at a learning rate; `pedro` holds the
    `PedroConfig` fields that differ from the defaults, as sorted (name, value) pairs."""

    group: str  # "matched" | "ablation"
    task: str  # "instruct" | "spam"
    method: str  # "LoRA r=8" | "IA3" | "PEDRO"
    steps: int
    lr: float
    pedro: tuple = ()
    label: str = ""  # what the row changes, for the tables
    order: int = 0  # the batch order: 0 is the study's; k > 0 draws another with seed + 1000 k (same data, same init)

    @property
    def key(self) -> str:
        changes = ",".join(f"{k}={v}" for k, v in self.pedro)
        return f"{self.task}|{self.method}|{self.steps}|{self.lr:g}|{changes}" + (
            f"|order={self.order}" if self.order else ""
        )

    def method_row(self, task_type: str, target: list[str]) -> Method:
        if self.method == "LoRA r=8":
            config = lambda: LoraConfig(task_type=task_type, r=8, lora_alpha=16, target_modules=target)  # noqa: E731
        elif self.method == "IA3":
            config = lambda: IA3Config(task_type=task_type)  # noqa: E731
        else:
            config = lambda: PedroConfig(task_type=task_type, **dict(self.pedro))  # noqa: E731
        return Method(self.method, self.lr, config)


LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
ORDERS = 3  # batch orders of each matched method's best-lr row


def pedro(group: str, task: str, steps: int, label: str, lr: float = PEDRO_LR, **changes) -> Row:
    return Row(group, task, "PEDRO", steps, lr, tuple(sorted(changes.items())), label)


def matched_methods(matched_rank: int) -> list[tuple[str, str, float, tuple]]:
    """(label, method, default lr, PEDRO changes) of the parameter-matched comparison."""
    return [
        ("LoRA r=8", "LoRA r=8", BASELINE_LRS["LoRA r=8"], ()),
        ("IA3", "IA3", BASELINE_LRS["IA3"], ()),
        ("PEDRO r=12 (default)", "PEDRO", PEDRO_LR, ()),
        (f"PEDRO r={matched_rank} (≤ LoRA r=8)", "PEDRO", PEDRO_LR, (("vg_rank", matched_rank),)),
        ("PEDRO r=1 (smallest)", "PEDRO", PEDRO_LR, (("vg_rank", 1),)),
    ]


def _finite_ppl(result: dict) -> float:
    """The held-out perplexity, +inf for a run whose loss was not finite (so that it is never the best)."""
    return result["answer_ppl"] if math.isfinite(result["answer_ppl"]) else math.inf


def best_lr(done: dict, rows: list[Row]) -> float | None:
    """The lr of the lowest held-out perplexity among `rows` (one method at one step count), once all have run."""
    if not rows or any(r.key not in done for r in rows):
        return None
    return min(rows, key=lambda r: _finite_ppl(done[r.key])).lr


def study_rows(matched_rank: int, lm_steps: tuple[int, int], cls_steps: int, done: dict | None = None) -> list[Row]:
    """Every row of the study; `matched_rank` is the largest `vg_rank` within LoRA r=8's parameter count.

    Every matched method runs the lr grid at the short step count and the long one at its default lr; once its grid
    is complete (`done`: the rows run so far, by key), its best lr of the grid also runs with `ORDERS - 1` other
    batch orders, which measures how much of a difference between methods is the luck of one order."""
    short, long = lm_steps
    rows = []
    for label, method, lr, changes in matched_methods(matched_rank):
        grid = [Row("matched", "instruct", method, short, x, changes, label) for x in sorted({lr, *LR_GRID})]
        rows += grid + [Row("matched", "instruct", method, long, lr, changes, label)]
        best = best_lr(done or {}, grid)
        if best is not None:
            rows += [Row("matched", "instruct", method, short, best, changes, label, k) for k in range(1, ORDERS)]
    for task, steps in (("instruct", short), ("spam", cls_steps)):
        if task == "spam":
            rows += [Row("ablation", task, name, steps, lr, (), name) for name, lr in BASELINE_LRS.items()]
            rows += [
                pedro("ablation", task, steps, "PEDRO defaults"),
                pedro("ablation", task, steps, "lr 1e-3", lr=1e-3),
                pedro("ablation", task, steps, "lr 1e-2", lr=1e-2),
            ]
        rows += [
            pedro("ablation", task, steps, "generator input: block input", generator_input="block"),
            pedro("ablation", task, steps, "pooler: mean", pooler="mean"),
            pedro("ablation", task, steps, "pooler: last prompt token", pooler="last"),
            pedro("ablation", task, steps, "up projection: random init", init_weights=False),
            pedro("ablation", task, steps, "activation: GeLU", activation="gelu"),
            pedro("ablation", task, steps, "vg_rank 48", vg_rank=48),
        ]
    return rows


# -- parameter budgets -------------------------------------------------------------------------------------------
def count_trainable(config_of, model_of) -> int:
    """Trainable parameters of `config_of()` on a meta-device copy of the model (no weights are allocated)."""
    with torch.device("meta"):
        model = get_peft_model(model_of(), config_of())
    return sum(p.numel() for p in trainable(model))


def matched_rank(model_of, task_type: str, target: list[str]) -> dict:
    """The largest `vg_rank` whose PEDRO has at most LoRA r=8's trainable parameters, and the counts."""
    lora = count_trainable(
        lambda: LoraConfig(task_type=task_type, r=8, lora_alpha=16, target_modules=target), model_of
    )
    ia3 = count_trainable(lambda: IA3Config(task_type=task_type), model_of)
    counts = {}
    for rank in range(1, 49):
        counts[rank] = count_trainable(lambda rank=rank: PedroConfig(task_type=task_type, vg_rank=rank), model_of)
        if counts[rank] > lora:
            break
    fitting = [rank for rank, n in counts.items() if n <= lora]
    if not fitting:
        raise SystemExit(f"PEDRO at vg_rank=1 has {counts[1]:,} parameters, more than LoRA r=8's {lora:,}")
    return {"lora_r8": lora, "ia3": ia3, "pedro_by_rank": counts, "matched_rank": max(fitting)}


# -- tasks -------------------------------------------------------------------------------------------------------
class Instruct:
    task_type, target = "CAUSAL_LM", ["q_proj", "v_proj"]

    def __init__(self, budget, seed: int):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.path, self.budget, self.seed = data.smollm2_path(), budget, seed
        tok = AutoTokenizer.from_pretrained(self.path)
        _, train, test = instruct_pairs(budget, seed)
        self.train_t, self.test_t = encode_chat(tok, train, budget.lm_len), encode_chat(tok, test, budget.lm_len)
        self.data = {
            "train_pairs": len(train),
            "test_pairs": len(test),
            "max_len": budget.lm_len,
            "batch": budget.lm_batch,
        }
        config = AutoConfig.from_pretrained(self.path)
        self.skeleton = lambda: AutoModelForCausalLM.from_config(config)
        self._auto = AutoModelForCausalLM

    def load(self):
        torch.manual_seed(self.seed)
        return self._auto.from_pretrained(self.path, dtype=torch.float32)

    def base_score(self) -> dict:
        return answer_loss(self.load(), self.test_t)

    def run(self, row: Row) -> dict:
        model = get_peft_model(self.load(), row.method_row(self.task_type, self.target).config())
        result = {"trainable_params": sum(p.numel() for p in trainable(model))}
        order_seed = self.seed + 1000 * row.order
        result.update(train_loop(model, self.train_t, row.steps, self.budget.lm_batch, row.lr, order_seed, row.key))
        result.update(answer_loss(model, self.test_t))
        return result


class Spam:
    task_type, target = "SEQ_CLS", ["query", "value"]

    def __init__(self, budget, seed: int):
        from transformers import AutoTokenizer

        self.budget, self.seed = budget, seed
        splits = data.spam_assassin(seed=seed)
        tok = AutoTokenizer.from_pretrained(data.minilm_path())
        test = splits["test"] if budget.cls_eval is None else _test_subset(splits["test"], budget.cls_eval, seed)
        self.train_t, self.test_t = (
            encode_cls(tok, splits["train"], budget.cls_len),
            encode_cls(tok, test, budget.cls_len),
        )
        self.data = {
            "train": len(splits["train"]),
            "test": len(test),
            "max_len": budget.cls_len,
            "batch": budget.cls_batch,
        }

    def run(self, row: Row) -> dict:
        budget = dataclasses.replace(self.budget, cls_steps=row.steps)
        method = row.method_row(self.task_type, self.target)
        result = run_spam_method(method, row.lr, self.train_t, self.test_t, budget, self.seed)
        return {k: result[k] for k in ("trainable_params", "train_seconds", "losses", "accuracy", "f1", "diverged")}


# -- results file ------------------------------------------------------------------------------------------------
def check_meta(res: dict, meta: dict, path: Path) -> None:
    for key in ("seed", "smoke", "lm_steps", "cls_steps", "budgets"):
        if json.loads(json.dumps(res["meta"].get(key))) != json.loads(json.dumps(meta[key])):
            raise SystemExit(f"{path} holds runs with another {key} ({res['meta'].get(key)}); pass another --out.")


def write_result(path: Path, update) -> dict:
    """Apply `update(res)` to the file's current content under its lock and write it atomically."""
    with FileLock(str(path) + ".lock"):
        res = json.loads(path.read_text())
        update(res)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(path)
    return res


# -- report ------------------------------------------------------------------------------------------------------
def _score(row: dict) -> str:
    if "answer_ppl" in row:
        return f"{row['answer_ppl']:.2f}" if math.isfinite(row["answer_ppl"]) else "diverged (loss not finite)"
    return f"{row['accuracy']:.3f}"


def defined_rows(res: dict) -> list[tuple[Row, dict]]:
    """The study's rows (labels and groups as the code defines them) with their results, in definition order."""
    meta = res["meta"]
    rows = study_rows(meta["budgets"]["matched_rank"], tuple(meta["lm_steps"]), meta["cls_steps"], res["rows"])
    return [(row, res["rows"][row.key]) for row in rows if row.key in res["rows"]]


def matched_summary(res: dict) -> list[dict]:
    """Per matched method: parameters; its best lr of the grid at the short step count (batch order 0), the
    perplexities there over every batch order run (`orders`) and their mean; the perplexity at the long step count
    at the method's default lr (None until run)."""
    short, long = res["meta"]["lm_steps"]
    done = defined_rows(res)
    summary = []
    for label, _, default_lr, _ in matched_methods(res["meta"]["budgets"]["matched_rank"]):
        grid = [(row, r) for row, r in done if row.label == label and row.steps == short and row.order == 0]
        if not grid:
            continue
        row, best = min(grid, key=lambda pair: _finite_ppl(pair[1]))
        orders = [r["answer_ppl"] for x, r in done if x.label == label and x.steps == short and x.lr == row.lr]
        at_long = next((r for x, r in done if x.label == label and x.steps == long and x.lr == default_lr), None)
        summary.append({"label": label, "method": row.method, "trainable_params": best["trainable_params"],
                        "lr": row.lr, "grid": {f"{x.lr:g}": r["answer_ppl"] for x, r in grid}, "orders": orders,
                        "short": sum(orders) / len(orders), "long_lr": default_lr,
                        "long": None if at_long is None else at_long["answer_ppl"]})  # fmt: skip
    return summary


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{sum(values) / len(values):.2f} ({min(values):.2f}–{max(values):.2f}, {len(values)} orders)"


def render_markdown(res: dict) -> str:
    meta = res["meta"]
    short, long = meta["lm_steps"]
    summary = matched_summary(res)
    lrs = sorted({lr for s in summary for lr in s["grid"]}, key=float)
    lines = [
        "# PEDRO: parameter-matched comparison and ablations (issue 19)",
        "",
        "Generated by `python -m benchmarks.pedro_study --render` from pedro_study.json. Commands: "
        + "; ".join(f"`{run['command']}`" for run in meta["runs"])
        + ".",
        "",
        f"Parameters: LoRA r=8 {meta['budgets']['lora_r8']:,}, IA3 {meta['budgets']['ia3']:,}, PEDRO by vg_rank "
        + ", ".join(f"r={r}: {n:,}" for r, n in meta["budgets"]["pedro_by_rank"].items())
        + f"; matched rank {meta['budgets']['matched_rank']}. Base model (no tuning) held-out answer perplexity "
        f"{meta.get('base_answer_ppl', float('nan')):.2f}.",
        "",
        "## Instruction tuning, held-out answer perplexity (lower is better)",
        "",
        f"At {short} steps each method runs at its best lr of the grid below (chosen on the held-out pairs with batch "
        "order 0; there is no separate validation split, which favours every method alike), with further batch orders "
        f"(mean, range); at {long} steps each runs once at its default lr.",
        "",
        f"| method | trainable parameters | best lr | {short} steps | {long} steps (lr) |",
        "|---|---|---|---|---|",
        *(
            f"| {s['label']} | {s['trainable_params']:,} | {s['lr']:g} | {_spread(s['orders'])} | "
            + ("–" if s["long"] is None else f"{s['long']:.2f} ({s['long_lr']:g})") + " |"
            for s in summary
        ),
        "",
        f"Learning-rate grid at {short} steps:",
        "",
        "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
        *(
            f"| {s['label']} | " + " | ".join(f"{s['grid'][lr]:.2f}" if lr in s["grid"] else "–" for lr in lrs) + " |"
            for s in summary
        ),
    ]  # fmt: skip
    done = defined_rows(res)
    for task, steps, what in (
        ("instruct", short, "held-out answer perplexity"),
        ("spam", meta["cls_steps"], "test accuracy"),
    ):
        reference = [
            (row, r)
            for row, r in done
            if row.task == task and row.steps == steps and row.group == "matched" and not row.order
        ]
        reference = [(row, r) for row, r in reference if row.lr == {"PEDRO": PEDRO_LR, **BASELINE_LRS}[row.method]]
        ablation = reference + [(row, r) for row, r in done if row.group == "ablation" and row.task == task]
        if not ablation:
            continue
        lines += ["", f"## Ablation on {task}, {steps} steps ({what})", "",
                  "| row | lr | trainable parameters | score | train s |", "|---|---|---|---|---|"]  # fmt: skip
        for row, r in ablation:
            lines.append(
                f"| {row.label} | {row.lr:g} | {r['trainable_params']:,} | {_score(r)} | {r['train_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def render_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = matched_summary(res)
    steps = res["meta"]["lm_steps"]
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 3.6), sharey=True)
    for ax, s, key in zip(axes, steps, ("short", "long"), strict=True):
        for point in (p for p in summary if p[key] is not None):
            marker = "o" if point["method"] == "PEDRO" else "s"
            ax.scatter(point["trainable_params"], point[key], marker=marker)
            ax.annotate(point["label"], (point["trainable_params"], point[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.axhline(res["meta"].get("base_answer_ppl", float("nan")), color="k", lw=0.8, ls=":", label="base model")
        ax.set_xscale("log")
        ax.set_title(
            f"SmolLM2-135M instruct, {s} steps" + (" (best lr, mean of orders)" if key == "short" else " (default lr)")
        )
        ax.set_xlabel("trainable parameters (log)")
    axes[0].set_ylabel("held-out answer perplexity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def render(path: Path) -> None:
    res = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render_markdown(res))
    if matched_summary(res):
        render_plot(res, path.with_suffix(".png"))


# -- main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=data.DEFAULT_SEED)
    parser.add_argument("--groups", default="matched,ablation")
    parser.add_argument("--tasks", default="instruct,spam")
    parser.add_argument("--only", nargs="*", help="row keys to run (default: every row of the groups)")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    parser.add_argument("--render", action="store_true", help="write the .md and .png from the JSON and exit")
    parser.add_argument("--smoke", action="store_true", help="2 and 3 steps, tiny data: checks the code path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = args.out / ("pedro_study_smoke.json" if args.smoke else "pedro_study.json")
    if args.render:
        render(path)
        return json.loads(path.read_text())
    set_threads(args.threads)
    budget = SMOKE if args.smoke else FULL
    lm_steps, cls_steps = ((2, 3), 3) if args.smoke else ((budget.lm_steps, 4 * budget.lm_steps), budget.cls_steps)
    tasks = {"instruct": Instruct(budget, args.seed)} if "instruct" in args.tasks else {}
    budgets = matched_rank(
        (tasks.get("instruct") or Instruct(budget, args.seed)).skeleton, "CAUSAL_LM", Instruct.target
    )
    done = json.loads(path.read_text())["rows"] if path.is_file() else {}
    rows = [
        r for r in study_rows(budgets["matched_rank"], lm_steps, cls_steps, done)
        if r.group in args.groups.split(",") and r.task in args.tasks.split(",")
        and (args.only is None or r.key in args.only)
    ]  # fmt: skip
    if args.list:
        print("\n".join(r.key for r in rows))
        return {}
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.pedro_study", *(argv or sys.argv[1:])])
    run_meta = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine_info()}
    meta = {"seed": args.seed, "smoke": args.smoke, "lm_steps": list(lm_steps), "cls_steps": cls_steps,
            "budgets": budgets, "runs": []}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            path.write_text(json.dumps({"meta": meta, "rows": {}}, indent=1) + "\n")

    def start_run(res: dict) -> None:
        check_meta(res, meta, path)
        res["meta"]["runs"].append(run_meta)

    res = write_result(path, start_run)
    if "spam" in args.tasks:
        tasks["spam"] = Spam(budget, args.seed)
    if "instruct" in tasks and "base_answer_ppl" not in res["meta"]:
        base = tasks["instruct"].base_score()
        res = write_result(path, lambda res: res["meta"].update(base_answer_ppl=base["answer_ppl"]))
    for row in rows:
        if row.key in res["rows"]:
            continue
        result = tasks[row.task].run(row)
        entry = {"group": row.group, "task": row.task, "method": row.method, "label": row.label, "steps": row.steps,
                 "lr": row.lr, "pedro": dict(row.pedro), **result, "load_average_end": list(os.getloadavg())}  # fmt: skip
        print(row.key, _score(entry), f"{entry['train_seconds']:.0f} s", flush=True)
        res = write_result(path, lambda res, entry=entry, key=row.key: res["rows"].__setitem__(key, entry))
    render(path)
    return res


if __name__ == "__main__":
    main()
