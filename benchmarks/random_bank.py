"""Random X-PEFT banks, settled (issue 17, item 3): does a random bank ever beat training the head alone?

    python -m benchmarks.random_bank --threads 1            # spam sweep, then the best settings on topic detection
    python -m benchmarks.random_bank --threads 1 --smoke    # a few steps per row, to check the code path

Task 1, ``spam``: SpamAssassin on all-MiniLM-L6-v2, the evaluation's splits and seed (``benchmarks.evaluate``), the
full test split, batch 16, 64 tokens, ``--spam-steps`` steps (1,000) per row, the same batch order for every row:
head only (lr 1e-2, 1e-1), X-PEFT soft and hard masks over random banks at several ``bank_init_scale`` values and mask
lr {1e-2, 1e-1}, and one dedicated bottleneck adapter (lr 1e-3). Before training, the residual of the composed adapter
relative to the output it is added to (``‖Δ‖ / ‖h‖`` over all tokens of one batch, mean over layers) is measured for
each X-PEFT row.

Task 2, ``topics``: chatterbot one-vs-rest topic detection on MiniLM (``benchmarks.profiles``: balanced, chance 0.5),
the ``--topics`` largest topics, ``--topic-steps`` steps each; head only and the best X-PEFT settings of task 1
(chosen from the JSON by spam accuracy: the best soft row, the best hard row, the best hard k=1 row), and the library
defaults (`XPeftConfig()` with only the mask type set, at the lr the docs recommend).

Rows are appended to ``<out>/random_bank.json`` as they finish (a rerun skips rows already there, so an interrupted
run resumes); ``random_bank.md`` is generated from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import xpeft  # noqa: E402

from . import data  # noqa: E402
from .evaluate import RESULTS, _test_subset, encode_cls, machine_info  # noqa: E402
from .evaluate import XPEFT_MASK_LR as DOCS_MASK_LR  # noqa: E402
from .profiles import MIN_TEST_PAIRS, MIN_TRAIN_PAIRS, add_bottleneck, encode, topic_examples  # noqa: E402
from .training import batches, f1_accuracy, set_threads, train_loop, trainable  # noqa: E402

SCALES = (1.0, 3.0, 10.0, 30.0)
MASK_LRS = (1e-2, 1e-1)


@dataclass(frozen=True)
class Setting:
    """One row: what trains (``head``, ``adapter``, ``xpeft``), at which lr; for X-PEFT the mask and bank scale
    (``scale=None``: the library default)."""

    kind: str
    lr: float
    mask_type: str | None = None
    hard_k: int | None = None
    scale: float | None = None

    @property
    def key(self) -> str:
        if self.kind != "xpeft":
            return f"{self.kind} lr={self.lr:g}"
        k = f" k={'default' if self.hard_k is None else self.hard_k}" if self.mask_type == "hard" else ""
        scale = "default" if self.scale is None else f"{self.scale:g}"
        return f"xpeft {self.mask_type}{k} scale={scale} lr={self.lr:g}"

    def config(self) -> xpeft.XPeftConfig:
        kwargs = {"task_type": "SEQ_CLS", "mask_type": self.mask_type}
        if self.hard_k is not None:
            kwargs["hard_k"] = self.hard_k
        if self.scale is not None:
            kwargs["bank_init_scale"] = self.scale
        return xpeft.XPeftConfig(**kwargs)


# Hard masks: a mean of k adapters has about 1/k of one adapter's residual, so each k gets the scales around the one
# that gives it the residual of the best soft setting.
HARD_SCALES = {1: (0.3, 1.0, 3.0), 8: (1.0, 3.0, 10.0), 32: (3.0, 10.0, 30.0)}


def spam_grid() -> list[Setting]:
    """The spam rows: references, soft masks over each scale (and the lr pair at 10), hard masks over their scales."""
    rows = [Setting("head", 1e-1), Setting("head", 1e-2), Setting("adapter", 1e-3)]
    rows += [Setting("xpeft", 1e-1, "soft", None, s) for s in SCALES] + [Setting("xpeft", 1e-2, "soft", None, 10.0)]
    rows += [Setting("xpeft", 1e-1, "hard", k, s) for k, scales in HARD_SCALES.items() for s in scales]
    return rows


def default_settings() -> list[Setting]:
    """The library defaults (`XPeftConfig()` with only the mask type) at the docs' mask lr."""
    return [Setting("xpeft", DOCS_MASK_LR, "soft"), Setting("xpeft", DOCS_MASK_LR, "hard")]


# --------------------------------------------------------------------------------------------------- one row
def build_model(setting: Setting, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the same classifier-head init for every row
    model = AutoModelForSequenceClassification.from_pretrained(data.minilm_path(), num_labels=2)
    if setting.kind == "xpeft":
        return get_peft_model(model, setting.config())
    if setting.kind == "adapter":
        add_bottleneck(model, xpeft_layer_names(seed))
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


def xpeft_layer_names(seed: int) -> list[str]:
    """The module paths X-PEFT adapts on MiniLM: where the dedicated adapter goes too."""
    probe = build_model(Setting("xpeft", 0.0, "soft", None, 1.0), seed)
    return sorted(m.layer_name for m in probe.modules() if isinstance(m, xpeft.x_peft.XPeftLayer))


def residual_ratio(model, batch: dict) -> float | None:
    """Mean over adapted layers of ‖layer output − base layer output‖ / ‖base layer output‖ on one batch."""
    layers = [m for m in model.modules() if isinstance(m, xpeft.x_peft.XPeftLayer)]
    if not layers:
        return None
    ratios = []

    def hook(module, args, output):
        base = module.base_layer(*args)
        ratios.append(float((output - base).norm() / base.norm()))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return sum(ratios) / len(ratios)


def accuracy(model, test_t: dict) -> dict:
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(test_t["labels"]), 64):
            batch = {k: v[i : i + 64] for k, v in test_t.items() if k != "labels"}
            preds.append(model(**batch).logits.argmax(-1))
    return f1_accuracy(torch.cat(preds), test_t["labels"])


def run_row(setting: Setting, train_t: dict, test_t: dict, steps: int, batch: int, seed: int, desc: str) -> dict:
    start = time.perf_counter()
    model = build_model(setting, seed)
    row = {**asdict(setting), "steps": steps, "batch": batch, "seed": seed}
    if setting.kind == "xpeft":
        config = model.peft_config["default"]
        row.update(mask_type=config.mask_type, hard_k=config.hard_k, scale=config.bank_init_scale)
        row["bank_size"] = config.bank_size
        row["init_residual_ratio"] = residual_ratio(model, {k: v[:batch] for k, v in train_t.items()})
    row["trainable_params"] = sum(p.numel() for p in trainable(model))
    losses = train_loop(model, train_t, steps, batch, setting.lr, seed, desc)["losses"]
    row["final_loss"] = sum(losses[-20:]) / len(losses[-20:])
    row["diverged"] = not math.isfinite(row["final_loss"])
    row.update(accuracy(model, test_t))
    row["seconds"] = time.perf_counter() - start
    row["load_average"] = list(os.getloadavg())
    return row


def pooled_features(model, tensors: dict) -> torch.Tensor:
    """The frozen encoder's pooled output (what the classifier reads), in eval mode, in chunks of 64."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model.bert(
                    input_ids=tensors["input_ids"][i : i + 64], attention_mask=tensors["attention_mask"][i : i + 64]
                ).pooler_output
                for i in range(0, len(tensors["labels"]), 64)
            ]
        )


def run_cached_heads(lrs, train_t: dict, test_t: dict, steps: int, batch: int, seed: int) -> dict[str, dict]:
    """Head only on cached encoder features: the classifier (same init, same batch order, dropout before it as in
    the model) trains on the pooled outputs of the frozen encoder computed once in eval mode. The one difference from
    the `head` rows: no dropout inside the frozen encoder. Costs one encoder pass over the data instead of one per
    step, so 1,000 steps fit where the `head` rows do not."""
    start = time.perf_counter()
    model = build_model(Setting("head", 0.0), seed)
    initial = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    train_x, test_x = pooled_features(model, train_t), pooled_features(model, test_t)
    feature_seconds = time.perf_counter() - start
    rows = {}
    for lr in lrs:
        start = time.perf_counter()
        torch.manual_seed(seed)
        model.classifier.load_state_dict(initial)
        model.train()
        opt = torch.optim.AdamW(model.classifier.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for idx in batches(len(train_x), batch, steps, seed):
            logits = model.classifier(model.dropout(train_x[idx]))
            loss = torch.nn.functional.cross_entropy(logits, train_t["labels"][idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            pred = model.classifier(test_x).argmax(-1)
        row = {"kind": "head_cached", "lr": lr, "mask_type": None, "hard_k": None, "scale": None, "steps": steps}
        row["default"] = False
        row.update(batch=batch, seed=seed, trainable_params=sum(p.numel() for p in model.classifier.parameters()))
        row["final_loss"] = sum(losses[-20:]) / len(losses[-20:])
        row["diverged"] = not math.isfinite(row["final_loss"])
        row.update(f1_accuracy(pred, test_t["labels"]))
        row["seconds"] = time.perf_counter() - start + feature_seconds
        row["feature_seconds"] = feature_seconds
        row["load_average"] = list(os.getloadavg())
        rows[f"head_cached lr={lr:g}"] = row
    return rows


# ---------------------------------------------------------------------------------------------------- tasks
def spam_data(seed: int, max_len: int, test_limit: int | None, train_limit: int | None = None):
    from transformers import AutoTokenizer

    splits = data.spam_assassin(seed=seed)
    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    test = splits["test"] if test_limit is None else _test_subset(splits["test"], test_limit, seed)
    train = splits["train"] if train_limit is None else splits["train"][:train_limit]
    return encode_cls(tok, train, max_len), encode_cls(tok, test, max_len)


def topic_data(seed: int, max_len: int, n_topics: int) -> dict[str, tuple[dict, dict]]:
    """The `n_topics` largest usable chatterbot topics, as in `benchmarks.profiles` (its new-profile topics)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    topics = data.chatterbot(seed=seed)
    distinct = {t: {part: len(set(pairs)) for part, pairs in topics[t].items()} for t in topics}
    usable = [t for t in sorted(topics, key=lambda t: (-distinct[t]["train"], t))
              if distinct[t]["train"] >= MIN_TRAIN_PAIRS and distinct[t]["test"] >= MIN_TEST_PAIRS]  # fmt: skip
    return {
        t: (
            encode(tok, topic_examples(topics, t, "train", seed), max_len),
            encode(tok, topic_examples(topics, t, "test", seed), max_len),
        )
        for t in usable[:n_topics]
    }


def best_settings(spam_rows: dict) -> list[Setting]:
    """Head only at its best spam lr, and the best soft, best hard and best hard k=1 X-PEFT rows of the spam task."""
    rows = list(spam_rows.values())

    def best(pred):
        chosen = [r for r in rows if pred(r)]
        return max(chosen, key=lambda r: r["accuracy"]) if chosen else None

    picks = [
        best(lambda r: r["kind"] == "head"),
        best(lambda r: r["kind"] == "xpeft" and r["mask_type"] == "soft"),
        best(lambda r: r["kind"] == "xpeft" and r["mask_type"] == "hard"),
        best(lambda r: r["kind"] == "xpeft" and r["mask_type"] == "hard" and r["hard_k"] == 1),
    ]
    fields = ("kind", "lr", "mask_type", "hard_k", "scale")
    settings = [Setting(**{f: r[f] for f in fields}) for r in picks if r is not None]
    return list(dict.fromkeys(settings))


# --------------------------------------------------------------------------------------------------- report
def load(path: Path, meta: dict) -> dict:
    if not path.is_file():
        return {"meta": meta, "spam": {}, "topics": {}}
    res = json.loads(path.read_text())
    for key in ("spam_steps", "topic_steps", "seed", "batch", "max_len", "smoke"):
        if res["meta"].get(key) != meta[key]:
            raise SystemExit(f"{path} holds runs with another {key} ({res['meta'].get(key)}); pass another --out.")
    res["meta"]["runs"] = res["meta"].get("runs", []) + meta["runs"]
    return res


def save(res: dict, path: Path) -> None:
    """Write `res`, keeping rows another process (another `--only` list) wrote to the same file meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        on_disk = json.loads(path.read_text())
        for task in ("spam", "topics"):
            res[task] = {**on_disk.get(task, {}), **res[task]}
        known = {run["started"] for run in res["meta"]["runs"]}
        res["meta"]["runs"] = [r for r in on_disk["meta"]["runs"] if r["started"] not in known] + res["meta"]["runs"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)
    path.with_suffix(".md").write_text(render_markdown(res))


def _describe(r: dict) -> str:
    if r["kind"] == "head":
        return "head only"
    if r["kind"] == "head_cached":
        return "head only, cached features (no dropout in the frozen encoder)"
    if r["kind"] == "adapter":
        return "dedicated bottleneck adapter"
    k = f" k={r['hard_k']}" if r["mask_type"] == "hard" else ""
    default = " (library defaults)" if r.get("default") else ""
    return f"X-PEFT {r['mask_type']}{k}, scale {r['scale']:g}{default}"


def render_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# Random X-PEFT banks (issue 17, item 3)",
        "",
        f"Generated from its JSON by `benchmarks/random_bank.py`. MiniLM (all-MiniLM-L6-v2), seed "
        f"{meta['seed']}, batch {meta['batch']}, {meta['max_len']} tokens, {meta['threads']} torch thread(s); bank "
        "size 100, r = d/16. `residual` is ‖Δ‖/‖h‖ of the composed adapter at init (mean over layers).",
        "",
    ]
    spam = res.get("spam", {})
    if spam:
        lines += [
            f"## Spam (SpamAssassin, {meta['spam_steps']} steps, test set of {meta.get('spam_test', '?')} mails)",
            "",
            "| setting | lr | residual at init | accuracy | F1 | final loss | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(spam.values(), key=lambda r: -r["accuracy"]):
            ratio = "–" if r.get("init_residual_ratio") is None else f"{r['init_residual_ratio']:.3g}"
            lines.append(
                f"| {_describe(r)} | {r['lr']:g} | {ratio} | {r['accuracy']:.4f} | {r['f1']:.3f} | "
                f"{r['final_loss']:.3f} | {r['seconds']:.0f} |"
            )
        lines.append("")
    topics = res.get("topics", {})
    if topics:
        names = meta.get("topic_names", [])
        lines += [
            f"## Topic detection (chatterbot one-vs-rest, chance 0.5, {meta['topic_steps']} steps per topic)",
            "",
            f"Topics: {', '.join(names)}. Accuracy is the mean over the topics.",
            "",
            "| setting | lr | mean accuracy | per topic |",
            "|---|---|---|---|",
        ]
        for r in sorted(topics.values(), key=lambda r: -r["accuracy"]):
            per = ", ".join(f"{t['accuracy']:.3f}" for t in r["per_topic"])
            lines.append(f"| {_describe(r)} | {r['lr']:g} | {r['accuracy']:.4f} | {per} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def run_spam(res, path, settings, args, default_keys=()):
    train_t, test_t = spam_data(args.seed, args.max_len, *((32, 64) if args.smoke else (None, None)))
    res["meta"]["spam_train"], res["meta"]["spam_test"] = len(train_t["labels"]), len(test_t["labels"])
    if args.cached_heads and not all(f"head_cached lr={lr:g}" in res["spam"] for lr in args.cached_heads):
        res["spam"].update(
            run_cached_heads(args.cached_heads, train_t, test_t, args.spam_steps, args.batch, args.seed)
        )
        print("[random_bank] spam cached heads done", flush=True)
        save(res, path)
    for s in settings:
        if s.key in res["spam"]:
            continue
        row = run_row(s, train_t, test_t, args.spam_steps, args.batch, args.seed, f"spam {s.key}")
        row["default"] = s.key in default_keys
        res["spam"][s.key] = row
        print(f"[random_bank] spam {s.key}: acc {row['accuracy']:.4f} ({row['seconds']:.0f} s)", flush=True)
        save(res, path)


def run_topics(res, path, settings, args, default_keys=()):
    topics = topic_data(args.seed, args.max_len, args.topics)
    res["meta"]["topic_names"] = list(topics)
    for s in settings:
        if s.key in res["topics"]:
            continue
        start, per_topic = time.perf_counter(), []
        for name, (train_t, test_t) in topics.items():
            row = run_row(s, train_t, test_t, args.topic_steps, args.batch, args.seed, f"topic {name} {s.key}")
            per_topic.append({"topic": name, "accuracy": row["accuracy"], "test": len(test_t["labels"])})
        row = {**row, "default": s.key in default_keys, "per_topic": per_topic}
        row["accuracy"] = sum(t["accuracy"] for t in per_topic) / len(per_topic)
        row["seconds"] = time.perf_counter() - start
        del row["f1"]
        res["topics"][s.key] = row
        print(f"[random_bank] topics {s.key}: mean acc {row['accuracy']:.4f}", flush=True)
        save(res, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=data.DEFAULT_SEED)
    parser.add_argument("--spam-steps", type=int, default=1000)
    parser.add_argument("--topic-steps", type=int, default=100)
    parser.add_argument("--topics", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument(
        "--cached-heads", type=float, nargs="*", default=[], help="lrs of head-only rows on cached features"
    )
    parser.add_argument("--with-defaults", action="store_true", help="add rows for the library defaults")
    parser.add_argument("--name", default="random_bank", help="results file name: <out>/<name>.json and .md")
    parser.add_argument("--tasks", default="spam,topics")
    parser.add_argument("--topic-only", nargs="*", help="topic settings, by key (default: the best of the spam rows)")
    parser.add_argument("--only", nargs="*", help="spam settings to run, by key (default: the whole grid)")
    parser.add_argument(
        "--smoke", action="store_true", help="3 steps per row, 64 train and 32 test mails, 1 topic, tiny grid"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.spam_steps, args.topic_steps, args.topics, args.batch, args.max_len = 3, 3, 1, 4, 32
    set_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.random_bank", *(argv or sys.argv[1:])])
    run_meta = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine_info()}
    meta = {k: getattr(args, k) for k in ("spam_steps", "topic_steps", "seed", "batch", "max_len", "smoke", "threads")}
    meta["runs"] = [run_meta]
    path = args.out / (f"{args.name}_smoke.json" if args.smoke else f"{args.name}.json")
    res = load(path, meta)
    defaults = default_settings() if args.with_defaults else []
    default_keys = {s.key for s in defaults}
    tasks = args.tasks.split(",")
    if "spam" in tasks:
        grid = spam_grid()
        if args.smoke:
            grid = [Setting("head", 1e-1), Setting("adapter", 1e-3), Setting("xpeft", 1e-1, "hard", 1, 10.0)]
        if args.only is not None:
            grid = [s for s in grid if s.key in args.only]
        run_spam(res, path, grid + defaults, args, default_keys)
    if "topics" in tasks:
        chosen = (
            [s for s in spam_grid() if s.key in args.topic_only] if args.topic_only else best_settings(res["spam"])
        )
        run_topics(res, path, chosen + defaults, args, default_keys)
    res["meta"]["runs"][-1]["seconds"] = time.perf_counter() - START
    res["meta"]["runs"][-1]["load_average_end"] = list(os.getloadavg())
    save(res, path)
    return res


START = time.perf_counter()

if __name__ == "__main__":
    main()
