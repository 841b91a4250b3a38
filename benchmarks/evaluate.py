"""Evaluation suite on real pretrained models and real data, offline (issue 7).

    python -m benchmarks.evaluate --jobs 2     # full run in 2 processes: about 45 min on 2 CPU cores; writes eval*
    python -m benchmarks.evaluate              # the same in one process, tasks one after the other
    python -m benchmarks.evaluate --quick      # shorter budget (about 40 min on a shared CPU); writes eval_quick*
    python -m benchmarks.evaluate --smoke      # a few steps per method, a few minutes; writes eval_smoke*
    python -m benchmarks.evaluate --tasks spam # one task (spam, instruct, profiles)
    python -m benchmarks.evaluate --tasks bank_size --threads 1   # X-PEFT bank-size study -> bank_size.{json,md,png}
    python -m benchmarks.evaluate --tasks "" --merge A/eval.json B/eval.json --readme benchmarks/README.md
                                               # join tasks run in parallel elsewhere; regenerate the README block

Tasks, all methods on the same splits, the same step budget, the same batch order and seed:

1. ``spam``: SpamAssassin on all-MiniLM-L6-v2: head only, full fine-tuning, peft LoRA r=8, IA3, HRA r=8 and xpeft
   ETHER, ETHER+, X-PEFT (soft, hard), PEDRO; test accuracy / F1, trainable parameters, bytes per saved profile, train
   time; and a learning-rate sweep 1e-4 .. 1e-1 for ETHER, ETHER+ and LoRA.
2. ``instruct``: SmolLM2-135M-Instruct tuned on chatterbot-corpus pairs, loss on the answer only: PEDRO, IA3,
   LoRA r=8, ETHER+ on q,v; held-out answer loss / perplexity, generations side by side, multi-tenant decode
   throughput (topics as tenants, per-sample ``adapter_names``).
3. ``profiles``: X-PEFT's own setting on MiniLM: each chatterbot topic is a profile (one-vs-rest topic detection);
   bottleneck adapters trained on the first topics form a bank, the remaining topics train masks only; compared with
   a dedicated adapter and LoRA per topic.
4. ``bank_size`` (a study with its own files, see ``bank_study.py``): the profiles setting with leave-one-out banks of
   1, 4 and 16 (at most the usable topics minus one) bottleneck or LoRA adapters, soft and hard masks.

Outputs: ``<out>/<prefix>.json`` (every number), ``<prefix>.md`` (tables generated from that JSON) and PNG plots
(if matplotlib is installed). xpeft methods missing from the installed xpeft are recorded as skipped, never faked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import HRAConfig, IA3Config, LoraConfig, get_peft_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import xpeft  # noqa: E402

from . import data  # noqa: E402
from .training import f1_accuracy, saved_profile_bytes, set_threads, tensor_bytes, train_loop, trainable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LR_SWEEP = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Budget:
    """Step budget and sizes; identical for every method within a run."""

    cls_steps: int = 100
    cls_batch: int = 16
    cls_len: int = 64
    cls_eval: int | None = None  # None: the whole held-out test split
    lm_steps: int = 40
    lm_batch: int = 4
    lm_len: int = 80
    lm_eval: int = 96
    generations: int = 3
    gen_tokens: int = 24
    decode_batch: int = 8
    decode_tokens: int = 16
    tenants: int = 4
    lr_sweep: tuple = LR_SWEEP
    profile_bank_topics: int = 4
    profile_steps: int = 40
    profile_eval: int = 64


FULL = Budget()
# What fits in this session's shared CPU (about 40 minutes under load): fewer steps, a fixed 400-mail test subset.
QUICK = Budget(
    cls_steps=40, cls_eval=400, lm_steps=20, lm_eval=48, profile_steps=20, profile_eval=32,
)  # fmt: skip
SMOKE = Budget(
    cls_steps=3, cls_batch=4, cls_len=32, cls_eval=32, lm_steps=2, lm_batch=2, lm_len=48, lm_eval=4, generations=1,
    gen_tokens=4, decode_batch=4, decode_tokens=2, tenants=2, lr_sweep=(1e-4, 1e-1), profile_bank_topics=2,
    profile_steps=2, profile_eval=8,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ method table
@dataclass(frozen=True)
class Method:
    """One row of a task: how to adapt the model, at which learning rate.

    ``config`` builds the peft config (``None`` for the non-peft rows ``head`` and ``full``); ``requires`` names the
    xpeft class the row needs, so a missing method is reported as skipped rather than crashing the run.
    """

    name: str
    lr: float
    config: Callable | None = None
    mode: str = "peft"  # "peft" | "head" | "full"
    requires: str | None = None
    family: str = "peft"  # "xpeft" | "peft" | "reference"


def xpeft_method(name: str, lr: float, config_class: str, **config_kwargs) -> Method:
    """A row for an xpeft method: its config class is looked up at run time, so a missing one is reported as skipped."""
    return Method(name, lr, lambda: getattr(xpeft, config_class)(**config_kwargs), "peft", config_class, "xpeft")


XPEFT_MASK_LR = 1e-1  # the mask learning rate docs/methods/x-peft.md recommends for random banks (random_bank.json)


def spam_methods() -> list[Method]:
    t = "SEQ_CLS"
    qv = ["query", "value"]
    return [
        Method("head only", 1e-2, mode="head", family="reference"),
        Method("full FT", 5e-5, mode="full", family="reference"),
        Method("LoRA r=8", 1e-3, lambda: LoraConfig(task_type=t, r=8, lora_alpha=16, target_modules=qv)),
        Method("IA3", 1e-2, lambda: IA3Config(task_type=t)),  # peft's BERT default: key, value, FFN output
        # HRA at ETHER's learning rate: both train Householder vectors (ETHER with one block is HRA with r=1).
        Method("HRA r=8", 1e-2, lambda: HRAConfig(task_type=t, r=8, target_modules=qv)),
        xpeft_method("ETHER", 1e-2, "EtherConfig", task_type=t, target_modules=qv),
        xpeft_method("ETHER+", 1e-2, "EtherConfig", task_type=t, target_modules=qv, variant="ether_plus"),
        xpeft_method("X-PEFT soft", XPEFT_MASK_LR, "XPeftConfig", task_type=t, mask_type="soft"),
        xpeft_method("X-PEFT hard", XPEFT_MASK_LR, "XPeftConfig", task_type=t, mask_type="hard"),
        xpeft_method("PEDRO", 3e-3, "PedroConfig", task_type=t),
    ]


SWEPT = ("ETHER", "ETHER+", "LoRA r=8")


def instruct_methods() -> list[Method]:
    t = "CAUSAL_LM"
    qv = ["q_proj", "v_proj"]
    return [
        xpeft_method("PEDRO", 3e-3, "PedroConfig", task_type=t),
        Method("IA3", 1e-2, lambda: IA3Config(task_type=t)),  # peft's Llama default: k, v, down_proj
        Method("LoRA r=8", 1e-3, lambda: LoraConfig(task_type=t, r=8, lora_alpha=16, target_modules=qv)),
        xpeft_method("ETHER+ q,v", 1e-2, "EtherConfig", task_type=t, target_modules=qv, variant="ether_plus"),
    ]


def missing(method: Method) -> str | None:
    if method.requires and not hasattr(xpeft, method.requires):
        return f"xpeft.{method.requires} is not available in the installed xpeft"
    return None


# ------------------------------------------------------------------------------------------------ task 1: spam
def encode_cls(tok, pairs, max_len):
    enc = tok([t for t, _ in pairs], truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([y for _, y in pairs]),
    }


def run_spam_method(method: Method, lr: float, train_t, test_t, budget: Budget, seed: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # same classifier-head init for every method
    model = AutoModelForSequenceClassification.from_pretrained(data.minilm_path(), num_labels=2)
    if method.mode == "peft":
        model = get_peft_model(model, method.config())
    elif method.mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    n_train = sum(p.numel() for p in trainable(model))
    row = {"method": method.name, "family": method.family, "lr": lr, "trainable_params": n_train}
    row.update(
        train_loop(model, train_t, budget.cls_steps, budget.cls_batch, lr, seed, f"spam {method.name} lr={lr:g}")
    )
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(test_t["labels"]), 64):
            logits = model(
                input_ids=test_t["input_ids"][i : i + 64], attention_mask=test_t["attention_mask"][i : i + 64]
            ).logits
            preds.append(logits.argmax(-1))
    row.update(f1_accuracy(torch.cat(preds), test_t["labels"]))
    row["final_loss"] = sum(row["losses"][-10:]) / len(row["losses"][-10:])
    row["diverged"] = not math.isfinite(row["final_loss"])
    if method.mode == "peft":
        row.update(saved_profile_bytes(model))
    else:  # head / full FT: the profile is the trainable tensors themselves
        row["saved_bytes"] = tensor_bytes(trainable(model))
        row["saved_bytes_excl_head"] = 0 if method.mode == "head" else tensor_bytes(
            p for n, p in model.named_parameters() if not n.startswith("classifier.")
        )  # fmt: skip
    return row


def task_spam(budget: Budget, seed: int, only: list[str] | None = None) -> dict:
    """Every spam row (or the rows named in `only`), with the lr sweeps of the `SWEPT` methods among them."""
    from transformers import AutoTokenizer

    splits = data.spam_assassin(seed=seed)
    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    test = splits["test"] if budget.cls_eval is None else _test_subset(splits["test"], budget.cls_eval, seed)
    train_t, test_t = encode_cls(tok, splits["train"], budget.cls_len), encode_cls(tok, test, budget.cls_len)
    rows, sweep, skipped = [], {}, []
    methods = [m for m in spam_methods() if only is None or m.name in only]
    jobs = []
    for m in methods:
        lrs = sorted(set(budget.lr_sweep) | {m.lr}) if m.name in SWEPT else [m.lr]
        jobs += [(m, lr) for lr in lrs]
    for m, lr in tqdm(jobs, desc="task spam"):
        reason = missing(m)
        if reason:
            if lr == m.lr:
                skipped.append({"method": m.name, "reason": reason})
            continue
        try:
            row = run_spam_method(m, lr, train_t, test_t, budget, seed)
        except Exception as err:  # a method that fails is a result to report, not a reason to lose the run
            skipped.append({"method": m.name, "lr": lr, "reason": f"{type(err).__name__}: {err}"})
            continue
        if lr == m.lr:
            rows.append(row)
        if m.name in SWEPT and lr in budget.lr_sweep:
            sweep.setdefault(m.name, []).append(
                {k: row[k] for k in ("lr", "accuracy", "f1", "final_loss", "diverged")}
            )
    return {
        "model": "all-MiniLM-L6-v2",
        "data": {"train": len(splits["train"]), "test": len(test), "max_len": budget.cls_len},
        "rows": rows,
        "lr_sweep": sweep,
        "skipped": skipped,
    }


def rerun_spam_rows(section: dict, names: list[str], budget: Budget, seed: int, run: dict) -> dict:
    """`section` (a spam section of the same budget and seed) with the rows named in `names` run again and replaced;
    every other row, and its run record, is kept. `run` (command, time, commit) is appended to ``reruns``."""
    new = task_spam(budget, seed, only=names)
    fresh = {r["method"]: r for r in new["rows"]}
    order = [m.name for m in spam_methods()]
    kept = [r for r in section["rows"] if r["method"] not in fresh]
    rows = sorted(kept + list(fresh.values()), key=lambda r: order.index(r["method"]) if r["method"] in order else 99)
    skipped = [s for s in section.get("skipped", []) if s["method"] not in names] + new["skipped"]
    sweep = {**section.get("lr_sweep", {}), **new["lr_sweep"]}
    return {**section, "rows": rows, "lr_sweep": sweep, "skipped": skipped,
            "reruns": [*section.get("reruns", []), {"methods": list(names), **run}]}  # fmt: skip


def _test_subset(pairs, n, seed):
    """A fixed subset of n test mails with the test split's spam ratio (seeded), for the shorter presets."""
    g = torch.Generator().manual_seed(seed)
    pos = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist() if pairs[i][1] == 1]
    neg = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist() if pairs[i][1] == 0]
    k = round(n * len(pos) / len(pairs))
    return neg[: n - k] + pos[:k]


# --------------------------------------------------------------------------------------------- task 2: instruct
def encode_chat(tok, pairs, max_len):
    ids, labels, masks = [], [], []
    for prompt, answer in pairs:
        head = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        p = tok(head, add_special_tokens=False)["input_ids"]
        a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        x, y = (p + a)[:max_len], ([-100] * len(p) + a)[:max_len]
        pad = max_len - len(x)
        ids.append(x + [tok.pad_token_id] * pad)
        labels.append(y + [-100] * pad)
        masks.append([1] * len(x) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks), "labels": torch.tensor(labels)}


def answer_loss(model, tensors, batch=8) -> dict:
    """Mean cross-entropy over answer tokens of the held-out pairs (the same token set for every method).

    The labels go into the forward as in training: PEDRO takes its prompt boundary from them (the tokens before the
    first supervised one). Without them it pools the whole text, the answer it is scored on included."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tensors["labels"]), batch):
            part = {k: v[i : i + batch] for k, v in tensors.items()}
            logits = model(**part).logits[:, :-1]
            target = part["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
                )
            )
            count += int((target != -100).sum())
    loss = total / max(1, count)
    return {"answer_loss": loss, "answer_ppl": math.exp(loss), "answer_tokens": count}


def encode_prompts(tok, prompts):
    """Chat-formatted, left-padded prompts ready for `generate`."""
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def generate(model, tok, prompts, max_new_tokens, adapter_names=None):
    enc = encode_prompts(tok, prompts)
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs
    )
    return enc, out


def decode_seconds(model, tok, prompts, budget: Budget, adapter_names=None) -> float:
    """Seconds to generate `decode_tokens` new tokens (greedy, fixed length) for the batch `prompts`."""
    model.eval()
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad():
        start = time.perf_counter()
        enc = encode_prompts(tok, prompts)
        model.generate(
            **enc, max_new_tokens=budget.decode_tokens, min_new_tokens=budget.decode_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, **kwargs,
        )  # fmt: skip
        return time.perf_counter() - start


def interleaved_throughput(runs: dict[str, Callable[[], float]], tokens: int, reps: int = 3) -> dict[str, float]:
    """Tokens per second of each run, timed in turn (one warm-up round, then `reps` rounds, median), so that a
    drifting machine load hits every run of the comparison alike."""
    times = {name: [] for name in runs}
    for round_ in range(reps + 1):
        for name, run in runs.items():
            seconds = run()
            if round_:
                times[name].append(seconds)
    return {name: tokens / sorted(t)[len(t) // 2] for name, t in times.items()}


def instruct_pairs(budget: Budget, seed: int):
    """chatterbot topics, all training pairs, and `lm_eval` held-out pairs drawn with `seed` (the instruct split)."""
    topics = data.chatterbot(seed=seed)
    train = [pa for t in sorted(topics) for pa in topics[t]["train"]]
    test = [pa for t in sorted(topics) for pa in topics[t]["test"]]
    g = torch.Generator().manual_seed(seed)
    test = [test[i] for i in torch.randperm(len(test), generator=g)[: budget.lm_eval].tolist()]
    return topics, train, test


def task_instruct(budget: Budget, seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    topics, train, test = instruct_pairs(budget, seed)
    train_t, test_t = encode_chat(tok, train, budget.lm_len), encode_chat(tok, test, budget.lm_len)
    gen_pairs = list({p: (p, a) for p, a in test}.values())[: budget.generations]  # distinct prompts
    gen_prompts = [p for p, _ in gen_pairs]
    tenant_topics = [t for t in sorted(topics, key=lambda t: -len(topics[t]["test"]))][: budget.tenants]
    decode_prompts = [
        topics[tenant_topics[i % budget.tenants]]["test"][i // budget.tenants][0] for i in range(budget.decode_batch)
    ]
    tenant_of_row = [tenant_topics[i % budget.tenants] for i in range(budget.decode_batch)]

    def load():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    base = load()
    rows = [{"method": "base (no tuning)", "family": "reference", "trainable_params": 0, **answer_loss(base, test_t)}]
    generations = {"prompts": gen_prompts, "reference": [a for _, a in gen_pairs], "outputs": {}}
    enc, out = generate(base, tok, gen_prompts, budget.gen_tokens)
    generations["outputs"]["base (no tuning)"] = tok.batch_decode(
        out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
    )
    throughput = [
        {
            "method": "base (no adapter)",
            **interleaved_throughput(
                {"tokens_per_s": lambda: decode_seconds(base, tok, decode_prompts, budget)},
                len(decode_prompts) * budget.decode_tokens,
            ),
        }
    ]
    skipped = []
    for m in tqdm(instruct_methods(), desc="task instruct"):
        reason = missing(m)
        if reason:
            skipped.append({"method": m.name, "reason": reason})
            continue
        try:
            model = get_peft_model(load(), m.config())
            row = {
                "method": m.name,
                "family": m.family,
                "lr": m.lr,
                "trainable_params": sum(p.numel() for p in trainable(model)),
            }
            row.update(train_loop(model, train_t, budget.lm_steps, budget.lm_batch, m.lr, seed, f"instruct {m.name}"))
            row.update(answer_loss(model, test_t))
            row.update(saved_profile_bytes(model))
            rows.append(row)
            enc, out = generate(model, tok, gen_prompts, budget.gen_tokens)
            generations["outputs"][m.name] = tok.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            throughput.append(_multi_tenant(base, model, m, tok, decode_prompts, tenant_topics, tenant_of_row, budget))
        except Exception as err:
            skipped.append({"method": m.name, "reason": f"{type(err).__name__}: {err}"})
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
        "data": {"train_pairs": len(train), "test_pairs": len(test), "max_len": budget.lm_len},
        "rows": rows,
        "generations": generations,
        "throughput": throughput,
        "tenants": tenant_topics,
        "skipped": skipped,
    }


def _multi_tenant(base, model, method, tok, prompts, tenants, tenant_of_row, budget) -> dict:
    """Decode throughput of the base model, of one adapter for the whole batch and of one adapter per topic mixed per
    sample, timed in turn (see [`interleaved_throughput`]): the table's ratios to the base compare runs made under
    the same machine load."""
    entry = {"method": method.name}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        # Every tenant gets its own adapter (a copy of the trained one: throughput does not depend on the values).
        for name in tenants:
            model.load_adapter(tmp, adapter_name=name)
    runs = {
        "base_tokens_per_s": lambda: decode_seconds(base, tok, prompts, budget),
        "tokens_per_s": lambda: decode_seconds(model, tok, prompts, budget),
    }
    if not hasattr(model.base_model, "_enable_peft_forward_hooks"):
        # peft silently ignores `adapter_names` for tuners without this hook (IA3 in peft 0.21): a "mixed" run would
        # decode every sample with the active adapter, so there is nothing honest to measure.
        entry["mixed_error"] = "per-sample adapter_names not supported by this peft tuner"
    else:
        try:
            decode_seconds(model, tok, prompts[:1], budget, tenant_of_row[:1])
            runs["mixed_tokens_per_s"] = lambda: decode_seconds(model, tok, prompts, budget, tenant_of_row)
            entry["tenants"] = len(tenants)
        except Exception as err:
            entry["mixed_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    entry.update(interleaved_throughput(runs, len(prompts) * budget.decode_tokens))
    return entry


# ------------------------------------------------------------------------------ study: ETHER quality (issue 18)
# `--tasks ether_quality`: ETHER and ETHER+ against LoRA r=8 on the instruct task (same data, steps, batch order and
# seed as `instruct`), over learning rates, target sets and block counts. Every run is one row of
# `<out>/ether_quality.json`, written as soon as it finishes, so an interrupted study resumes where it stopped and
# several processes (`--jobs`) share one file.
QUALITY_TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}


@dataclass(frozen=True)
class QualityGrid:
    """What the study runs. Phase 1 is fixed; phase 2 follows from phase 1's results (see `quality_pending`)."""

    lora_lrs: tuple = (1e-3, 3e-3)
    ether_lrs: tuple = (1e-3, 3e-3, 1e-2, 3e-2)
    block_counts: tuple = (4, 8)  # tried at each ETHER variant's best lr; 32 (the default) is in phase 1
    default_blocks: int = 32
    targets: tuple = ("q,v", "all-linear")
    extend_edge: bool = True  # a best lr at an end of a sweep adds one step past that end (x or / ~3.3)


QUALITY_FULL = QualityGrid()
QUALITY_SMOKE = QualityGrid(lora_lrs=(1e-3,), ether_lrs=(1e-2, 3e-2), block_counts=(4,), targets=("q,v",))


@dataclass(frozen=True)
class QualityRun:
    method: str  # "LoRA r=8" | "ETHER" | "ETHER+"
    targets: str  # a key of QUALITY_TARGETS
    lr: float
    n_blocks: int | None = None  # ETHER variants only

    @property
    def key(self) -> str:
        blocks = "" if self.n_blocks is None else f" n_blocks={self.n_blocks}"
        return f"{self.method} {self.targets} lr={self.lr:g}{blocks}"

    def config(self):
        t, modules = "CAUSAL_LM", QUALITY_TARGETS[self.targets]
        if self.method == "LoRA r=8":
            return LoraConfig(task_type=t, r=8, lora_alpha=16, target_modules=modules)
        variant = {"ETHER": "ether", "ETHER+": "ether_plus"}[self.method]
        return xpeft.EtherConfig(task_type=t, target_modules=modules, variant=variant, n_blocks=self.n_blocks)


ETHER_VARIANTS = ("ETHER+", "ETHER")  # ETHER+ first: the goal is about it


def _next_lr(lr: float, down: bool = False) -> float:
    """The next point of a 1-3-10 sweep: 1e-2 -> 3e-2 -> 1e-1 (``down``: 1e-2 -> 3e-3 -> 1e-3)."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    step = 3 if (mantissa < 2) != down else 10 / 3
    return float(f"{lr / step if down else lr * step:.3g}")


def _extend_sweep(sweep: list[QualityRun], done: dict) -> QualityRun | None:
    """While the best finished run of `sweep` sits at an end of its lr range, the sweep grows one step past that end.
    Returns the next such run still to make (None once the best is inside the range); `sweep` gets the runs made."""
    while (best := _best([done[r.key] for r in sweep if r.key in done])) is not None:
        lrs = sorted(r.lr for r in sweep)
        if best["lr"] not in (lrs[0], lrs[-1]) or len(lrs) == 1:
            return None
        edge = sweep[0]
        nxt = QualityRun(edge.method, edge.targets, _next_lr(best["lr"], down=best["lr"] == lrs[0]), edge.n_blocks)
        sweep.append(nxt)
        if nxt.key not in done:
            return nxt
    return None


def _best(rows: list[dict]) -> dict | None:
    done = [r for r in rows if math.isfinite(r.get("answer_loss", math.nan))]
    return min(done, key=lambda r: r["answer_loss"]) if done else None


def quality_pending(grid: QualityGrid, done: dict) -> list[QualityRun]:
    """The runs still to make, most important first, given the rows `done` (keyed by `QualityRun.key`).

    Phase 1: LoRA r=8 and both ETHER variants at the default block count over their lr grids, on every target set.
    Phase 2, per method and target set once its phase-1 runs are all done: one lr step past the end of the sweep
    where the best lr sits at an end (repeated while it stays there), then, for the ETHER variants, the other block
    counts at the best lr. A failed run counts as done (its row records the error) so nothing is retried forever.
    """
    order = [QualityRun("LoRA r=8", t, grid.lora_lrs[0]) for t in grid.targets]
    # The middle of the grid first (the likely best points finish before the edges), target sets interleaved, so an
    # unfinished study still compares every target set.
    lrs = sorted(grid.ether_lrs, key=lambda lr: (abs(math.log10(lr) + 2), -lr))
    for variant in ETHER_VARIANTS:
        order += [QualityRun(variant, t, lr, grid.default_blocks) for lr in lrs for t in grid.targets]
    order += [QualityRun("LoRA r=8", t, lr) for t in grid.targets for lr in grid.lora_lrs[1:]]
    for t in grid.targets:
        sweep = [QualityRun("LoRA r=8", t, lr) for lr in grid.lora_lrs]
        if grid.extend_edge and all(r.key in done for r in sweep) and (edge := _extend_sweep(sweep, done)):
            order.append(edge)
    for variant in ETHER_VARIANTS:
        for t in grid.targets:
            sweep = [QualityRun(variant, t, lr, grid.default_blocks) for lr in grid.ether_lrs]
            if any(r.key not in done for r in sweep):
                continue
            if grid.extend_edge and (edge := _extend_sweep(sweep, done)):
                order.append(edge)  # the edge point first, then the block counts at the final best lr
                continue
            best = _best([done[r.key] for r in sweep if r.key in done])
            if best is not None:
                order += [QualityRun(variant, t, best["lr"], n) for n in grid.block_counts]
    return [r for r in order if r.key not in done]


class _InstructSetup:
    """What every run of the study shares: the tokenized instruct split and a seeded model loader."""

    def __init__(self, budget: Budget, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.seed = data.smollm2_path(), seed
        self._model_class = AutoModelForCausalLM
        tok = AutoTokenizer.from_pretrained(self.path)
        _, train, test = instruct_pairs(budget, seed)
        self.train_t, self.test_t = encode_chat(tok, train, budget.lm_len), encode_chat(tok, test, budget.lm_len)
        self.data = {"train_pairs": len(train), "test_pairs": len(test), "max_len": budget.lm_len}

    def load(self):
        torch.manual_seed(self.seed)  # the same initial ETHER vectors / LoRA A for every lr of a setting
        return self._model_class.from_pretrained(self.path, dtype=torch.float32)


def run_quality_point(run: QualityRun, setup: _InstructSetup, budget: Budget) -> dict:
    """Train one setting; the held-out answer loss before training (how far the adapter's init moves the model)
    and after."""
    row = {"key": run.key, **asdict(run)}
    start, load = time.perf_counter(), list(os.getloadavg())
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        model = get_peft_model(setup.load(), run.config())
        row["trainable_params"] = sum(p.numel() for p in trainable(model))
        if run.method == "ETHER":  # LoRA (B = 0) and ETHER+ (v = -u) start at the base model exactly
            row["initial_answer_loss"] = answer_loss(model, setup.test_t)["answer_loss"]
        desc = f"ether_quality {run.key}"
        row.update(train_loop(model, setup.train_t, budget.lm_steps, budget.lm_batch, run.lr, setup.seed, desc))
        row.update(answer_loss(model, setup.test_t))
        row["diverged"] = not math.isfinite(row["answer_loss"])
    except Exception as err:  # a setting that fails is a result to report, not a reason to lose the study
        row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    row["run"] = {
        "started_utc": started,
        "seconds": time.perf_counter() - start,
        "load_average_start": load,
        "load_average_end": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    return row


def _quality_lock(path: Path):
    from filelock import FileLock

    # The lock lives in the temp folder, not beside the results (nothing to clean up or commit by mistake).
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"xpeft-ether-quality-{name}.lock"))


def _quality_file(out: Path, smoke: bool) -> Path:
    return out / ("ether_quality_smoke.json" if smoke else "ether_quality.json")


def _quality_read(path: Path, meta: dict) -> dict:
    """The study's results so far; a file made with another budget or seed is refused (its rows would not compare)."""
    if not path.is_file():
        return {"meta": meta, "runs": {}}
    res = json.loads(path.read_text())
    if not res.get("runs"):  # a file that holds only the `ether_init` section so far
        return {**res, "meta": meta, "runs": {}}
    settings = ("budget", "seed", "grid")
    if {k: res["meta"].get(k) for k in settings} != json.loads(json.dumps({k: meta[k] for k in settings})):
        raise SystemExit(
            f"{path} holds runs made with another budget, seed or grid; move it away (or pass another --out) to start "
            "a new study."
        )
    return res


def _quality_meta(budget: Budget, grid: QualityGrid, seed: int, command: str) -> dict:
    return {
        "command": command,
        "seed": seed,
        "budget": {k: getattr(budget, k) for k in ("lm_steps", "lm_batch", "lm_len", "lm_eval")},
        "grid": asdict(grid),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
        "machine": machine_info(),
    }


def task_ether_quality(budget, grid, seed, out: Path, smoke: bool, command: str, shard=(0, 1)) -> dict:
    """Run this process's share (`shard` = (k, n): every n-th pending run from the k-th) of the pending runs."""
    path, meta = _quality_file(out, smoke), _quality_meta(budget, grid, seed, command)
    with _quality_lock(path):
        res = _quality_read(path, meta)
    todo = quality_pending(grid, res["runs"])[shard[0] :: shard[1]]
    if not todo:
        return res
    setup = _InstructSetup(budget, seed)
    for run in tqdm(todo, desc=f"ether_quality {shard[0] + 1}/{shard[1]}"):
        row = run_quality_point(run, setup, budget)
        row["run"]["git_commit"] = meta["machine"]["git_commit"]
        row["run"]["command"] = command
        with _quality_lock(path):  # read again: other processes write their rows into the same file
            res = _quality_read(path, meta)
            res["runs"][run.key] = row
            res["meta"]["data"] = setup.data
            _quality_write(res, path)
        print(f"[ether_quality] {run.key}: " + (row.get("error") or f"ppl {row['answer_ppl']:.2f}"), flush=True)
    return res


def run_quality_study(budget, grid, seed, out: Path, smoke: bool, jobs: int, command: str, threads) -> dict:
    """Rounds of `jobs` worker processes until nothing is pending (phase 2 runs appear as phase 1 completes)."""
    path, meta = _quality_file(out, smoke), _quality_meta(budget, grid, seed, command)
    previous = None
    while True:
        with _quality_lock(path):
            res = _quality_read(path, meta)
        pending = [r.key for r in quality_pending(grid, res["runs"])]
        if not pending or pending == previous:
            break
        previous = pending
        if jobs <= 1:
            task_ether_quality(budget, grid, seed, out, smoke, command)
            continue
        n = min(jobs, len(pending))
        cmd = [sys.executable, "-m", "benchmarks.evaluate", "--tasks", "ether_quality", "--seed", str(seed)]
        cmd += ["--out", str(out), "--threads", str(threads or 1)] + (["--smoke"] if smoke else [])
        children = [
            subprocess.Popen(cmd + ["--shard", f"{k}/{n}"], cwd=Path(__file__).resolve().parent.parent)
            for k in range(n)
        ]
        if any(child.wait() != 0 for child in children):
            raise SystemExit("an ether_quality worker failed; see its output above (finished runs are kept)")
    with _quality_lock(path):
        res = _quality_read(path, meta)
        res["meta"]["command"] = command  # the study's command, not a worker's (each row keeps its own)
        _quality_write(res, path)
    return res


def _quality_write(res: dict, path: Path) -> None:
    res["meta"]["plots"] = render_quality_plot(res, path.with_suffix(".png"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)  # a reader never sees half a file
    path.with_suffix(".md").write_text(render_quality_markdown(res))


def quality_summary(runs: dict) -> list[dict]:
    """Per method and target set: the best run and its perplexity against the best LoRA r=8 on the same targets."""
    rows = [r for r in runs.values() if "answer_loss" in r and math.isfinite(r["answer_loss"])]
    out = []
    for t in QUALITY_TARGETS:
        lora = _best([r for r in rows if r["method"] == "LoRA r=8" and r["targets"] == t])
        for method in ("LoRA r=8", *ETHER_VARIANTS):
            best = _best([r for r in rows if r["method"] == method and r["targets"] == t])
            if best is None:
                continue
            entry = {"method": method, "targets": t, "best": best["key"], "answer_ppl": best["answer_ppl"]}
            if lora is not None:
                entry["lora_ppl"] = lora["answer_ppl"]
                entry["ratio_to_lora"] = best["answer_ppl"] / lora["answer_ppl"]
                entry["within_10_percent"] = entry["ratio_to_lora"] <= 1.10
            out.append(entry)
    return out


def render_quality_markdown(res: dict) -> str:
    if not res.get("runs"):
        return "# ETHER quality at the settings users pick\n" + "\n".join(render_init_markdown(res.get("init"))) + "\n"
    meta, b = res["meta"], res["meta"]["budget"]
    d = meta.get("data", {})
    out = [
        "# ETHER quality at the settings users pick (instruction tuning)",
        "",
        f"{meta['model']}, chatterbot {d.get('train_pairs', '?')} train / {d.get('test_pairs', '?')} held-out pairs, "
        f"{b['lm_steps']} steps × batch {b['lm_batch']}, {b['lm_len']} tokens, loss on answers only; the same batch "
        f"order and seed (`{meta['seed']}`) for every run. Every number is in `ether_quality.json`; "
        f"generated by `{meta['command']}`.",
        "",
        "Best per method and target set (perplexity of the held-out answers; ratio to the best LoRA r=8 on the same "
        "targets; the issue's goal is ETHER+ ≤ 1.10):",
        "",
        "| method | targets | best setting | perplexity | / LoRA r=8 |",
        "|---|---|---|---|---|",
    ]
    for s in quality_summary(res["runs"]):
        ratio = f"{s['ratio_to_lora']:.2f}" if "ratio_to_lora" in s else "–"
        out.append(f"| {s['method']} | {s['targets']} | {s['best']} | {s['answer_ppl']:.2f} | {ratio} |")
    out += [
        "",
        "Every run (initial = held-out answer loss of the adapted model before training, measured for plain ETHER "
        "only: LoRA and ETHER+ start at the base model):",
        "",
        "| method | targets | lr | n_blocks | initial loss | held-out loss | perplexity | trainable params | train s | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(("LoRA r=8", *ETHER_VARIANTS))}
    rows = sorted(
        res["runs"].values(),
        key=lambda r: (list(QUALITY_TARGETS).index(r["targets"]), order[r["method"]], r["n_blocks"] or 0, r["lr"]),
    )
    for r in rows:
        blocks = "–" if r["n_blocks"] is None else str(r["n_blocks"])
        if "error" in r:
            out.append(f"| {r['method']} | {r['targets']} | {r['lr']:g} | {blocks} | failed: {r['error']} ||||||")
            continue
        out.append(
            f"| {r['method']} | {r['targets']} | {r['lr']:g} | {blocks} | {_num(r.get('initial_answer_loss'))} | "
            f"{r['answer_loss']:.3f} | {r['answer_ppl']:.2f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
            f"{r['run']['load_average_start'][0]:.1f} |"
        )
    if meta.get("plots"):
        out += ["", *(f"![{name.removesuffix('.png')}]({name})" for name in meta["plots"])]
    out += render_init_markdown(res.get("init"))
    return "\n".join(out) + "\n"


def _num(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def render_init_markdown(init: dict | None) -> list[str]:
    if not init:
        return []
    s, i = init["spam"], init["instruct"]
    out = [
        "",
        "## Why plain ETHER starts far from the base model",
        "",
        "ETHER+ starts at the identity (v = -u). Plain ETHER's H = I - 2uu^T reflects one random direction in each of "
        "the n blocks, so each adapted layer's input moves by about 2·sqrt(n/d) of its norm (isotropic input) before "
        "any training. Relative output change ||f(x) - Wx|| / ||Wx|| of every adapted layer at init, on the layer's "
        f"own input (`{init['command']}`, commit `{init['git_commit'][:10]}`):",
        "",
        f"Spam ({s['model']}, targets {', '.join(s['targets'])}, d = {s['d']}, {s['probe_mails']} training mails; "
        "[CLS] = the final hidden state the head reads; loss with the task's seeded random head):",
        "",
        "| variant | n_blocks | per-layer change mean (min–max) | 2·sqrt(n/d) (0: identity) | [CLS] change | "
        "initial loss (base) |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        out.append(
            f"| {r['variant']} | {r['n_blocks']} | {r['mean_relative_change']:.3f} ({r['min_relative_change']:.3f}–"
            f"{r['max_relative_change']:.3f}) | {r['predicted_isotropic']:.3f} | {r['cls_relative_change']:.3f} | "
            f"{r['initial_loss']:.3f} ({r['base_loss']:.3f}) |"
        )
    out += [
        "",
        f"Instruct ({i['model']}, plain ETHER, d = {i['d']} (1536 into down_proj); answer loss of the "
        f"{i['probe_pairs']} probe pairs at init, base model in brackets):",
        "",
        "| targets | n_blocks | per-layer change mean (min–max) | mean 2·sqrt(n/d) | initial answer loss (base) |",
        "|---|---|---|---|---|",
    ]
    for r in i["rows"]:
        out.append(
            f"| {r['targets']} | {r['n_blocks']} | {r['mean_relative_change']:.3f} ({r['min_relative_change']:.3f}–"
            f"{r['max_relative_change']:.3f}) | {r['predicted_isotropic']:.3f} | {r['initial_answer_loss']:.3f} "
            f"({r['base_answer_loss']:.3f}) |"
        )
    if s.get("runs"):
        out += [
            "",
            "Spam runs that test it (100 steps × batch 16, the spam task's budget; eval.json's lr sweep has "
            "n_blocks = 32):",
            "",
            "| variant | n_blocks | lr | test acc | test F1 | first loss | final loss (last 10) | train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in s["runs"]:
            out.append(
                f"| {r['variant']} | {r['n_blocks']} | {r['lr']:g} | {r['accuracy']:.4f} | {r['f1']:.4f} | "
                f"{r['first_losses'][0]:.3f} | {r['final_loss']:.3f} | {r['train_seconds']:.0f} |"
            )
    return out


def render_quality_plot(res: dict, path: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs = [r for r in res["runs"].values() if "answer_ppl" in r and math.isfinite(r["answer_ppl"])]
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(QUALITY_TARGETS), figsize=(11, 4), sharey=True)
    for ax, t in zip(axes, QUALITY_TARGETS, strict=True):
        for i, method in enumerate(("LoRA r=8", *ETHER_VARIANTS)):
            sel = [r for r in runs if r["method"] == method and r["targets"] == t]
            blocks = sorted({r["n_blocks"] for r in sel}, key=lambda n: -1 if n is None else n)
            for n in blocks:
                pts = sorted((r["lr"], r["answer_ppl"]) for r in sel if r["n_blocks"] == n)
                label = method if n is None else f"{method} n_blocks={n}"
                style = "-o" if n in (None, res["meta"]["grid"]["default_blocks"]) else "s"
                ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=label, alpha=1 if style == "-o" else 0.6)
        ax.set(xscale="log", yscale="log", xlabel="learning rate", title=f"targets: {t}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out answer perplexity (log)")
    fig.suptitle(f"SmolLM2-135M instruct, {res['meta']['budget']['lm_steps']} steps")
    _save(fig, path)
    return [path.name]


# -------------------------------------------------- study: why plain ETHER starts far from the base model (issue 18)
# `--tasks ether_init`: ETHER+ starts at the identity (v = -u); plain ETHER cannot (H = I - 2uu^T with a random u
# reflects one direction per block). For a block of k = d/n features and an input x spread evenly over directions,
# E||x - Hx||^2 = 4 E(u.x)^2 = 4 ||x_b||^2 / k, summed over the n blocks: 4 n ||x||^2 / d, so every adapted layer's
# input moves by about 2 sqrt(n / d) of its norm, whatever the lr. Measured here per layer, end to end and in the
# initial loss, against n_blocks; written into the `init` section of ether_quality.json.
INIT_BLOCKS = {"spam": (1, 4, 8, 16, 32, 64), "instruct": (1, 4, 8, 32)}
INIT_SMOKE_BLOCKS = {"spam": (1, 32), "instruct": (32,)}
# 100-step spam runs that test the explanation (the lr sweep of eval.json has n_blocks=32 at 1e-4 .. 1e-1).
INIT_SPAM_RUNS = (("ether", 1, 1e-3),)


def layer_output_change(model, inputs: dict, mask: torch.Tensor) -> list[dict]:
    """Per adapted layer, ||f_adapted(x) - W x|| / ||W x|| over the real tokens of one forward (x = the layer's own
    input in the adapted model; bias excluded from both)."""
    from xpeft.ether.layer import EtherLayer

    found, hooks = [], []

    def hook(name):
        def fn(module, args, output):
            base = module.get_base_layer()
            x, keep = args[0], mask.bool()
            plain = torch.nn.functional.linear(x, base.weight)
            shift = output - (plain if base.bias is None else plain + base.bias)
            change = float(shift[keep].norm() / plain[keep].norm())
            found.append({"layer": name, "in_features": x.shape[-1], "relative_change": change})

        return fn

    for name, module in model.named_modules():
        if isinstance(module, EtherLayer):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def _summary(changes: list[dict], n: int, variant: str) -> dict:
    vals = [c["relative_change"] for c in changes]
    predicted = [2 * math.sqrt(n / c["in_features"]) if variant == "ether" else 0.0 for c in changes]
    return {
        "n_blocks": n,
        "layers": len(vals),
        "mean_relative_change": sum(vals) / len(vals),
        "min_relative_change": min(vals),
        "max_relative_change": max(vals),
        "predicted_isotropic": sum(predicted) / len(predicted),  # 2 sqrt(n / d) per layer; 0: ETHER+ is I
        "per_layer": changes,
    }


def ether_init_spam(budget: Budget, seed: int, blocks, runs) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    splits = data.spam_assassin(seed=seed)
    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    train_t, test_t = encode_cls(tok, splits["train"], budget.cls_len), encode_cls(tok, splits["test"], budget.cls_len)
    probe = {k: v[:64] for k, v in train_t.items()}
    inputs = {k: probe[k] for k in ("input_ids", "attention_mask")}
    out = {"model": "all-MiniLM-L6-v2", "targets": ["query", "value"], "d": 384, "probe_mails": 64, "rows": []}
    for variant in ("ether", "ether_plus"):
        for n in blocks:
            torch.manual_seed(seed)  # the classifier head of the spam task's runs
            model = AutoModelForSequenceClassification.from_pretrained(data.minilm_path(), num_labels=2)
            config = xpeft.EtherConfig(
                task_type="SEQ_CLS", target_modules=["query", "value"], variant=variant, n_blocks=n
            )
            model = get_peft_model(model, config)
            model.eval()
            row = {
                "variant": variant,
                **_summary(layer_output_change(model, inputs, probe["attention_mask"]), n, variant),
            }
            with torch.no_grad():
                adapted = model(**inputs, labels=probe["labels"], output_hidden_states=True)
                with model.disable_adapter():
                    base = model(**inputs, labels=probe["labels"], output_hidden_states=True)
            cls_a, cls_b = adapted.hidden_states[-1][:, 0], base.hidden_states[-1][:, 0]
            row["cls_relative_change"] = float((cls_a - cls_b).norm() / cls_b.norm())
            row["initial_loss"], row["base_loss"] = float(adapted.loss), float(base.loss)
            out["rows"].append(row)
    method = {"ether": "ETHER", "ether_plus": "ETHER+"}
    out["runs"] = []
    for variant, n, lr in runs:
        m = xpeft_method(
            f"{method[variant]} n_blocks={n}", lr, "EtherConfig", task_type="SEQ_CLS",
            target_modules=["query", "value"], variant=variant, n_blocks=n,
        )  # fmt: skip
        row = run_spam_method(m, lr, train_t, test_t, budget, seed)
        row.update({"variant": variant, "n_blocks": n})
        out["runs"].append({k: v for k, v in row.items() if k != "losses"} | {"first_losses": row["losses"][:10]})
        print(f"[ether_init] spam {m.name} lr={lr:g}: acc {row['accuracy']:.4f}", flush=True)
    return out


def ether_init_instruct(budget: Budget, seed: int, blocks) -> dict:
    setup = _InstructSetup(budget, seed)
    probe = {k: v[:16] for k, v in setup.test_t.items()}
    inputs = {k: probe[k] for k in ("input_ids", "attention_mask")}
    out = {"model": "SmolLM2-135M-Instruct", "d": 576, "probe_pairs": 16, "rows": []}
    base = None
    for targets in QUALITY_TARGETS:
        for n in blocks:
            run = QualityRun("ETHER", targets, 1e-3, n)
            model = get_peft_model(setup.load(), run.config())
            row = {"variant": "ether", "targets": targets}
            row.update(_summary(layer_output_change(model, inputs, probe["attention_mask"]), n, "ether"))
            row["initial_answer_loss"] = answer_loss(model, probe)["answer_loss"]
            if base is None:
                with model.disable_adapter():
                    base = answer_loss(model, probe)["answer_loss"]
            row["base_answer_loss"] = base
            out["rows"].append(row)
            print(
                f"[ether_init] instruct ETHER {targets} n_blocks={n}: loss {row['initial_answer_loss']:.3f}",
                flush=True,
            )
    return out


def task_ether_init(budget: Budget, seed: int, out: Path, smoke: bool, command: str) -> dict:
    blocks = INIT_SMOKE_BLOCKS if smoke else INIT_BLOCKS
    runs = INIT_SPAM_RUNS[:1] if smoke else INIT_SPAM_RUNS
    section = {"command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    section["load_average_start"] = list(os.getloadavg())
    section["spam"] = ether_init_spam(budget, seed, blocks["spam"], runs)
    section["instruct"] = ether_init_instruct(budget, seed, blocks["instruct"])
    section["load_average_end"] = list(os.getloadavg())
    section["git_commit"] = machine_info()["git_commit"]
    path = _quality_file(out, smoke)
    with _quality_lock(path):
        res = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "runs": {}}
        res["init"] = section
        _quality_write(res, path)
    return section


# ----------------------------------------------------------------------------------------------------- report
def machine_info() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "git_commit": commit,
    }


def _fmt_bytes(n):
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


README_BEGIN, README_END = "<!-- evaluate:begin -->", "<!-- evaluate:end -->"


def render_readme_block(res: dict) -> str:
    """benchmarks/README.md's results section: the report's tables and plots (not the sample generations), one heading level
    down, between the markers that `--readme` replaces."""
    body = render_markdown(res, generations=False, plot_dir="results/")
    body = "\n".join(("#" + line if line.startswith("## ") else line) for line in body.splitlines()[2:])
    preset = " --quick" if res["meta"]["prefix"] == "eval_quick" else ""
    note = (
        f"<!-- Generated by `python -m benchmarks.evaluate{preset} ... --readme benchmarks/README.md` from "
        f"benchmarks/results/{res['meta']['prefix']}.json: edit the runner, not this block. -->"
    )
    return f"{README_BEGIN}\n{note}\n{body.strip()}\n{README_END}"


def update_readme(path: Path, res: dict) -> None:
    text = path.read_text()
    start = text.find(README_BEGIN)
    end = text.find(README_END, max(start, 0))
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill; add the two markers first.")
    path.write_text(text[:start] + render_readme_block(res) + text[end + len(README_END) :])


def render_markdown(res: dict, generations: bool = True, plot_dir: str = "") -> str:
    title = {
        "eval_smoke": " (SMOKE: a few steps, numbers mean nothing)",
        "eval_quick": " (quick preset: short budget)",
    }
    out = [f"# xpeft evaluation{title.get(res['meta'].get('prefix'), '')}", ""]
    meta = res["meta"]
    out.append(
        f"torch {meta['machine']['torch']}, transformers {meta['machine']['transformers']}, peft {meta['machine']['peft']}, "
        f"{meta['machine']['cpu_count']} CPU cores. Every number below is in `{meta['prefix']}.json`; "
        "each section names the command that produced it, its duration and the machine load (other jobs shared the CPU "
        "when the load average exceeds the core count)."
    )
    if meta.get("tasks_run") is not None and set(meta["tasks_run"]) != {k for k in TASK_NAMES if k in res}:
        out.append(f"\nThis file was last written by `{meta['command']}`; sections come from the runs they name.")
    b = meta["budget"]
    if "spam" in res:
        s = res["spam"]
        out += [
            "",
            f"## Spam classification ({s['model']}, SpamAssassin {s['data']['train']} train / {s['data']['test']} test mails, "
            f"{b['cls_steps']} steps × batch {b['cls_batch']}, {b['cls_len']} tokens)",
            "",
            "| method | lr | test acc | test F1 | trainable params | bytes / profile (excl. head) | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            out.append(
                f"| {r['method']} | {r['lr']:g} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['trainable_params']:,} | "
                f"{_fmt_bytes(r['saved_bytes'])} ({_fmt_bytes(r['saved_bytes_excl_head'])}) | {r['train_seconds']:.1f} |"
            )
        if s["lr_sweep"]:
            lrs = sorted({e["lr"] for v in s["lr_sweep"].values() for e in v})
            out += ["", "Learning-rate sweep (test accuracy; † = loss not finite):", ""]
            out += ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
            for name, entries in s["lr_sweep"].items():
                by = {e["lr"]: e for e in entries}
                cells = [
                    f"{by[lr]['accuracy']:.4f}{'†' if by[lr]['diverged'] else ''}" if lr in by else "–" for lr in lrs
                ]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += _skipped(s)
    if "instruct" in res:
        s = res["instruct"]
        out += [
            "",
            f"## Instruction tuning ({s['model']}, chatterbot {s['data']['train_pairs']} train / {s['data']['test_pairs']} "
            f"held-out pairs, {b['lm_steps']} steps × batch {b['lm_batch']}, {b['lm_len']} tokens, loss on answers only)",
            "",
            "| method | lr | held-out answer loss | perplexity | trainable params | bytes / profile | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            lr = f"{r['lr']:g}" if "lr" in r else "–"
            ts = f"{r['train_seconds']:.1f}" if "train_seconds" in r else "–"
            out.append(
                f"| {r['method']} | {lr} | {r['answer_loss']:.4f} | {r['answer_ppl']:.2f} | {r['trainable_params']:,} | "
                f"{_fmt_bytes(r.get('saved_bytes'))} | {ts} |"
            )
        out += [
            "",
            f"Decode throughput, batch {b['decode_batch']}, {b['decode_tokens']} new tokens, tenants = {', '.join(s['tenants'])}:",
            "",
        ]
        out += [
            "| method | one adapter (tok/s) | mixed tenants per sample (tok/s) | base, timed in turn (tok/s) | "
            "one adapter / base | mixed / base |",
            "|---|---|---|---|---|---|",
        ]
        for t in s["throughput"]:
            mixed = f"{t['mixed_tokens_per_s']:.1f}" if "mixed_tokens_per_s" in t else t.get("mixed_error", "–")
            base_tps = t.get("base_tokens_per_s")
            ratios = ["–", "–"]
            if base_tps:
                ratios[0] = f"{t['tokens_per_s'] / base_tps:.2f}"
                if "mixed_tokens_per_s" in t:
                    ratios[1] = f"{t['mixed_tokens_per_s'] / base_tps:.2f}"
            base_cell = f"{base_tps:.1f}" if base_tps else "–"
            out.append(
                f"| {t['method']} | {t['tokens_per_s']:.1f} | {mixed} | {base_cell} | {ratios[0]} | {ratios[1]} |"
            )
        g = s["generations"]
        if generations:
            out += ["", "Generations (greedy):", ""]
            for i, prompt in enumerate(g["prompts"]):
                out += [f"**Q:** {prompt!r}  ", f"*reference:* {g['reference'][i]!r}  "]
                out += [f"- {name}: {texts[i]!r}" for name, texts in g["outputs"].items()]
                out.append("")
        out += _skipped(s)
    if "profiles" in res:
        s = res["profiles"]
        out += [
            "",
            f"## Many profiles ({s['setting']})",
            "",
            "| method | mean acc | bytes / profile (excl. head) | trainable params / profile |",
            "|---|---|---|---|",
        ]
        for r in s["rows"]:
            out.append(
                f"| {r['method']} | {r['accuracy']:.4f} | {_fmt_bytes(r['saved_bytes'])} ({_fmt_bytes(r['saved_bytes_excl_head'])}) | {r['trainable_params']:,} |"
            )
        out += _skipped(s)
    plots = res["meta"].get("plots") or []
    if plots:
        out += ["", "Plots:", ""] + [f"![{name.removesuffix('.png')}]({plot_dir}{name})" for name in plots]
    return "\n".join(out) + "\n"


def _run_line(section):
    r = section.get("run")
    if not r:
        return []
    return [
        "",
        f"Run: `{r['command']}` at {r['started_utc']}, {r['seconds']:.0f} s, {r['torch_threads']} torch threads, load "
        f"average {r['load_average_start'][0]:.1f} → {r['load_average_end'][0]:.1f}, commit `{r['git_commit'][:10]}`.",
    ] + [
        f"Rows {', '.join(x['methods'])} run again: `{x['command']}` at {x['started_utc']}, {x['seconds']:.0f} s, "
        f"commit `{x['git_commit'][:10]}`."
        for x in section.get("reruns", [])
    ]


def _skipped(section):
    if not section.get("skipped"):
        return _run_line(section)
    return _run_line(section) + [
        "",
        "Not run: " + "; ".join(f"{s['method']}: {s['reason']}" for s in section["skipped"]),
    ]


def render_plots(res: dict, out: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    s = res.get("spam")
    if s and s["rows"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in s["rows"]:
            ax.scatter(max(1, r["trainable_params"]), r["accuracy"], color="C1" if r["family"] == "xpeft" else "C0")
            ax.annotate(r["method"], (max(1, r["trainable_params"]), r["accuracy"]), fontsize=7)
        ax.set(
            xscale="log",
            xlabel="trainable parameters (log)",
            ylabel="test accuracy",
            title="Spam / MiniLM (orange: xpeft)",
        )
        files.append(_save(fig, out / f"{prefix}_spam_acc_vs_params.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in s["rows"]:
            ax.barh(
                r["method"], max(1, r["saved_bytes_excl_head"] or 1), color="C1" if r["family"] == "xpeft" else "C0"
            )
        ax.set(xscale="log", xlabel="bytes per saved profile, excluding the task head (log)", title="Profile size")
        files.append(_save(fig, out / f"{prefix}_bytes_per_profile.png"))
        if s["lr_sweep"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, entries in s["lr_sweep"].items():
                ax.plot([e["lr"] for e in entries], [e["accuracy"] for e in entries], marker="o", label=name)
            ax.set(
                xscale="log",
                xlabel="learning rate",
                ylabel="test accuracy",
                title="Learning-rate sweep (spam / MiniLM)",
            )
            ax.legend()
            files.append(_save(fig, out / f"{prefix}_lr_sweep.png"))
    return files


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


TASKS = {"spam": task_spam, "instruct": task_instruct}
TASK_NAMES = ("spam", "instruct", "profiles")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="a few steps per method (checks the runner, not the methods)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter budget (40 steps per classifier, 20 per LM)")
    parser.add_argument(
        "--tasks",
        default="spam,instruct,profiles",
        help="comma-separated subset of spam,instruct,profiles; or ether_quality: the ETHER lr / target / n_blocks "
        "study against LoRA on the instruct task, written to <out>/ether_quality.json (resumes an unfinished one); "
        "or bank_size: the X-PEFT bank-size study, written to <out>/bank_size.{json,md,png} (see bank_study.py)",
    )
    parser.add_argument(
        "--mask-lr",
        type=float,
        default=None,
        help="bank_size only: use this mask learning rate for every run instead of choosing one on the validation "
        "split (recorded as not swept)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="K/N: run only every N-th pending ether_quality run from the K-th (--jobs uses it)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--seed", type=int, default=data.DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="run the tasks in this many processes of one torch thread each, then merge"
    )
    parser.add_argument(
        "--merge", nargs="*", default=[], help="results JSON files (same preset) whose task sections join this one"
    )
    parser.add_argument(
        "--readme", type=Path, default=None, help="also regenerate the results block of this README from the results"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="spam only: run just these rows again (e.g. 'X-PEFT soft' 'X-PEFT hard'); the other rows are kept from "
        "the spam section given with --merge",
    )
    args = parser.parse_args(argv)
    if args.readme and args.out.resolve() != RESULTS:
        # The README block links the plots and the JSON under benchmarks/results/.
        parser.error("--readme needs the results in benchmarks/results/: drop --out (merge runs made elsewhere).")
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # one load report per model load would drown the progress bars
    if args.smoke and args.quick:
        parser.error("--smoke and --quick are exclusive")
    budget = SMOKE if args.smoke else QUICK if args.quick else FULL
    prefix = "eval_smoke" if args.smoke else "eval_quick" if args.quick else "eval"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in (*TASKS, "profiles", "ether_quality", "ether_init", "bank_size")]
    if unknown:
        parser.error(
            f"unknown task(s) {unknown}; choose from spam, instruct, profiles, ether_quality, ether_init, bank_size"
        )
    if args.mask_lr is not None and "bank_size" not in tasks:
        parser.error("--mask-lr sets the bank_size study's mask learning rate: pass --tasks bank_size")
    if args.shard and tasks not in (["ether_quality"], ["bank_size"]):
        parser.error(
            "--shard splits the ether_quality or bank_size study only: pass --tasks ether_quality or bank_size"
        )
    if args.methods is not None:
        unknown_rows = sorted(set(args.methods) - {m.name for m in spam_methods()})
        if tasks != ["spam"] or not args.merge or unknown_rows:
            parser.error(
                "--methods re-runs rows of the spam task: pass --tasks spam, the results file whose other rows to keep "
                f"with --merge, and row names from {[m.name for m in spam_methods()]}"
                + (f" (unknown: {unknown_rows})" if unknown_rows else "")
            )
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.evaluate", *(argv if argv is not None else sys.argv[1:])])
    if "ether_init" in tasks:
        tasks.remove("ether_init")
        task_ether_init(SMOKE if args.smoke else FULL, args.seed, args.out, args.smoke, command)
        if not tasks:
            return {}
    if "bank_size" in tasks:
        tasks.remove("bank_size")
        from dataclasses import replace

        from . import bank_study

        plan = bank_study.SMOKE_PLAN if args.smoke else bank_study.FULL_PLAN
        if args.mask_lr is not None:
            plan = replace(plan, mask_lrs=(args.mask_lr,), swept=False)
        helper = None
        if args.jobs > 1 and not args.shard:
            # One helper process takes the runs in the opposite order; the two share the cache of finished runs and
            # only this process writes the results.
            cmd = [sys.executable, "-m", "benchmarks.evaluate", "--tasks", "bank_size", "--shard", "1/2"]
            cmd += ["--seed", str(args.seed), "--threads", str(args.threads or 1), "--out", tempfile.mkdtemp()]
            cmd += (["--smoke"] if args.smoke else []) + (
                [] if args.mask_lr is None else ["--mask-lr", str(args.mask_lr)]
            )
            helper = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
        if args.shard:
            _parse_shard(parser, args.shard)
        budget_ = SMOKE if args.smoke else FULL
        study = bank_study.run_bank_study(
            budget_, plan, args.seed, args.out, args.smoke, command, reverse=bool(args.shard)
        )
        if helper is not None and helper.wait() != 0:
            raise SystemExit("the bank_size helper process failed; see its output above (finished runs are cached)")
        if args.readme:
            bank_study.update_readme(args.readme, study)  # its own block; the eval block only with eval tasks
        if not tasks:
            return {}
    if "ether_quality" in tasks:
        tasks.remove("ether_quality")
        grid = QUALITY_SMOKE if args.smoke else QUALITY_FULL
        lm_budget = SMOKE if args.smoke else FULL  # the instruct budget of `eval.json`'s LoRA row, never --quick's
        if args.shard:
            k, n = _parse_shard(parser, args.shard)
            task_ether_quality(lm_budget, grid, args.seed, args.out, args.smoke, command, (k, n))
        else:
            run_quality_study(lm_budget, grid, args.seed, args.out, args.smoke, args.jobs, command, args.threads)
        if not tasks:
            return {}
    res = {
        "meta": {
            "command": command,
            "smoke": args.smoke,
            "prefix": prefix,
            "seed": args.seed,
            "budget": asdict(budget),
            "machine": machine_info(),
            "xpeft_methods": [n for n in ("EtherConfig", "XPeftConfig", "PedroConfig") if hasattr(xpeft, n)],
            "tasks_run": tasks,
        }
    }
    for path in args.merge:
        # Sections of runs made elsewhere (e.g. tasks run in parallel into another folder) join this results file; each
        # keeps the run record (command, time, load, commit) of the run that produced it.
        other = json.loads(Path(path).read_text())
        for task in (k for k in TASK_NAMES if k in other):
            if _settings(other, task) != _settings(res, task):
                parser.error(f"the {task} section of {path} was made with another budget or seed; it cannot be merged")
            res[task] = other[task]
    if args.jobs > 1 and len(tasks) > 1:
        preset = ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
        res.update(run_in_parallel(tasks, args.jobs, preset, args.seed, prefix))
        tasks = []
    for task in tasks:
        start, load = time.perf_counter(), list(os.getloadavg())
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if task == "profiles":
            from .profiles import task_profiles

            res[task] = task_profiles(budget, args.seed)
        elif args.methods is not None:
            if "spam" not in res:
                parser.error("--methods: the files given with --merge hold no spam section to keep the other rows of")
            record = {"command": command, "started_utc": started, "git_commit": res["meta"]["machine"]["git_commit"]}
            res[task] = rerun_spam_rows(res[task], args.methods, budget, args.seed, record)
            res[task]["reruns"][-1]["seconds"] = time.perf_counter() - start
            _write(res, args.out, prefix)
            continue
        else:
            res[task] = TASKS[task](budget, args.seed)
        res[task]["run"] = {
            "command": command,
            "started_utc": started,
            "seconds": time.perf_counter() - start,
            "load_average_start": load,
            "load_average_end": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(),
            "git_commit": res["meta"]["machine"]["git_commit"],
        }
        _write(res, args.out, prefix)  # partial results survive an interrupted run
    if not tasks:
        _write(res, args.out, prefix)
    if args.readme:
        update_readme(args.readme, res)
    return res


def _parse_shard(parser, text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        parser.error(f"--shard {text!r} is not K/N with 0 <= K < N (e.g. --shard 0/2 and --shard 1/2)")
    return k, n


# Relative single-thread cost of the tasks (full budget: spam 43 min, instruct 18 min, profiles 12 min).
TASK_COST = {"spam": 3, "instruct": 2, "profiles": 1}


def plan_jobs(tasks: list[str], jobs: int) -> list[list[str]]:
    """Split `tasks` into at most `jobs` groups of similar cost (longest first, each to the least loaded group)."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(tasks)))]
    load = [0] * len(groups)
    for task in sorted(tasks, key=lambda t: -TASK_COST[t]):
        i = load.index(min(load))
        groups[i].append(task)
        load[i] += TASK_COST[task]
    return groups


def run_in_parallel(tasks: list[str], jobs: int, preset: list[str], seed: int, prefix: str) -> dict:
    """Run groups of tasks in child processes of one torch thread each; return their task sections (each keeps the
    run record of the child that made it)."""
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for i, group in enumerate(plan_jobs(tasks, jobs)):
            out = Path(tmp) / f"job{i}"
            cmd = [sys.executable, "-m", "benchmarks.evaluate", *preset, "--tasks", ",".join(group)]
            cmd += ["--threads", "1", "--seed", str(seed), "--out", str(out)]
            children.append((subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent), out, group))
        failed = [group for child, _, group in children if child.wait() != 0]
        if failed:
            raise SystemExit(f"evaluation job(s) for {failed} failed; see their output above")
        sections = {}
        for _, out, _ in children:
            sections.update(
                {k: v for k, v in json.loads((out / f"{prefix}.json").read_text()).items() if k in TASK_NAMES}
            )
    return sections


# The budget fields each task reads: sections merge when these (and the seed) agree.
TASK_BUDGET_FIELDS = {
    "spam": ("cls_steps", "cls_batch", "cls_len", "cls_eval", "lr_sweep"),
    "instruct": ("lm_steps", "lm_batch", "lm_len", "lm_eval", "generations", "gen_tokens", "decode_batch",
                 "decode_tokens", "tenants"),
    "profiles": ("cls_batch", "cls_len", "profile_bank_topics", "profile_steps", "profile_eval"),
}  # fmt: skip


def _settings(res: dict, task: str) -> dict:
    meta = res.get("meta", {})
    budget = {k: (meta.get("budget") or {}).get(k) for k in TASK_BUDGET_FIELDS[task]}
    return json.loads(json.dumps({"budget": budget, "seed": meta.get("seed")}))  # tuples -> lists


def _write(res, out: Path, prefix: str) -> dict:
    previous = out / f"{prefix}.json"
    if previous.is_file():
        # Keep the other tasks' sections of earlier runs with the same settings (read now, not at start, so runs of
        # different tasks into one folder do not overwrite each other); every section records the run that made it.
        old = json.loads(previous.read_text())
        for key in TASK_NAMES:
            if key in old and key not in res["meta"]["tasks_run"] and _settings(old, key) == _settings(res, key):
                res.setdefault(key, old[key])
    res["meta"]["plots"] = render_plots(res, out, prefix)
    (out / f"{prefix}.json").write_text(json.dumps(res, indent=1))
    (out / f"{prefix}.md").write_text(render_markdown(res))
    return res


if __name__ == "__main__":
    main()
