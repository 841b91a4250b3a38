"""Task "bank_size" of the evaluation suite: how X-PEFT's accuracy grows with the bank (issue 17, item 2).

The setting of the "profiles" task (`profiles.py`): MiniLM one-vs-rest chatterbot topic detection, one profile per
topic. Here every usable topic (same rule as `profiles.py`) trains, once, one bottleneck adapter (as `profiles.py`) and
one peft LoRA r=8 adapter on query/value (`profiles.py`'s LoRA baseline). They are cached, so a rerun reuses them
(and every finished run), and they serve twice: as bank entries, and, for the evaluation topics, as the "dedicated
adapter" and "LoRA r=8" baselines. A head-only baseline trains the classifier alone.

Evaluation topics are the ``eval_topics`` largest usable topics. Topics with enough training pairs for an adapter but
too few test pairs to be scored (``bank_only_topics``: chatterbot's "gossip", 18 training pairs and 1 test pair) train
a bank adapter too; they are never evaluated. The bank order is fixed: the other usable topics from the largest to the
smallest, then the bank-only topics, then the evaluation topics in the same order. For evaluation topic t, the bank of
size K is the first K topics of that order other than t (leave-one-out: a bank never holds t's own adapter), so K can
be at most the length of that order minus one; larger requested sizes are capped and the JSON says so.

For each evaluation topic, bank kind (bottleneck, LoRA), mask type (soft; hard with ``hard_k=1``) and K, X-PEFT
trains its masks and the classifier head (same steps, batch order, data and seed as the baselines) and is scored on
the topic's held-out test examples. The mask learning rate (which the head shares) is chosen per (kind, mask type)
at the largest K from ``mask_lrs`` by mean accuracy (ties: lower loss) on a validation split carved from the
training examples (whole prompts held out), never the test set; it is then used for every K.

Writes ``<out>/bank_size.json`` (every number), ``bank_size.md`` (tables and the goals met or missed, generated from
that JSON) and ``bank_size.png``; ``--smoke`` writes ``bank_size_smoke.*``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import xpeft

from . import data
from .profiles import (
    LR_ADAPTER,
    LR_LORA,
    add_bottleneck,
    bank_only_topics,
    encode,
    lora_baseline_config,
    safetensors_bytes,
    topic_examples,
    usable_topics,
    xpeft_target_names,
)
from .training import f1_accuracy, saved_profile_bytes, tensor_bytes, train_loop, trainable

CACHE_VERSION = 2  # raise when a change makes cached adapters or runs stale
KINDS = ("bottleneck", "lora")
MASKS = ("soft", "hard")
HARD_K = 1  # set explicitly: the study must not follow a change of XPeftConfig's default
LR_HEAD = 1e-2  # the spam task's head-only learning rate
GOAL_POINTS = {"soft": 3.0, "hard": 5.0}  # largest accuracy gap to LoRA r=8, in points
GOAL_BYTES = 1024  # largest saved profile (masks only)
README_BEGIN, README_END = "<!-- bank_size:begin -->", "<!-- bank_size:end -->"


@dataclass(frozen=True)
class BankPlan:
    """What the study runs (the step budget comes from `evaluate.Budget`: profile_steps, cls_batch, cls_len,
    profile_eval)."""

    eval_topics: int = 4
    bank_sizes: tuple = (1, 4, 16)
    mask_lrs: tuple = (3e-2, 1e-1, 3e-1)
    swept: bool = True  # False: use mask_lrs[0] without validation runs (recorded as not swept)
    validation_fraction: float = 0.2


FULL_PLAN = BankPlan()
SMOKE_PLAN = BankPlan(eval_topics=2, bank_sizes=(1, 2), mask_lrs=(1e-1,))  # one lr: the sweep path, at half the cost


def bank_order(usable: list[str], n_eval: int, bank_only: list[str] = ()) -> list[str]:
    """The fixed order banks are filled in: the non-evaluation usable topics largest first, then the bank-only topics,
    then the evaluation topics."""
    return usable[n_eval:] + list(bank_only) + usable[:n_eval]


def bank_topics(order: list[str], topic: str, k: int) -> list[str]:
    """The bank of size `k` for evaluation topic `topic`: the first `k` topics of `order` other than `topic`."""
    return [t for t in order if t != topic][:k]


def split_validation(triples: list[tuple], fraction: float, seed: int, topic: str) -> tuple[list, list]:
    """Hold out whole prompts (seeded) until at least `fraction` of the examples are held out: (train, validation).

    Whole prompts, so that no validation example shares its prompt with a training example (as for the test split).
    """
    rng = random.Random(f"{seed}-{topic}-validation")
    counts = Counter(p for p, _, _ in triples)
    prompts = sorted(counts)
    rng.shuffle(prompts)
    held, n_held = set(), 0
    for prompt in prompts:
        if n_held >= fraction * len(triples):
            break
        held.add(prompt)
        n_held += counts[prompt]
    return [x for x in triples if x[0] not in held], [x for x in triples if x[0] in held]


def score(model, tensors: dict) -> dict:
    """Accuracy and mean cross-entropy of `model` on one batch of encoded examples."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    return {
        "accuracy": f1_accuracy(logits.argmax(-1), tensors["labels"])["accuracy"],
        "loss": float(F.cross_entropy(logits, tensors["labels"])),
        "examples": len(tensors["labels"]),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class BankStudy:
    """The study's data, model loader and cache of trained adapters, banks and finished runs."""

    def __init__(self, budget, plan: BankPlan, seed: int, cache: Path | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.budget, self.plan, self.seed = budget, plan, seed
        path = data.minilm_path()
        tok = AutoTokenizer.from_pretrained(path)
        topics = data.chatterbot(seed=seed)
        self.usable = usable_topics(topics)
        self.eval_topics = self.usable[: plan.eval_topics]
        self.bank_only = bank_only_topics(topics)
        self.order = bank_order(self.usable, plan.eval_topics, self.bank_only)
        largest = len(self.order) - 1
        self.bank_sizes = sorted({min(k, largest) for k in plan.bank_sizes})
        needed = set(self.eval_topics)
        for t in self.eval_topics:
            needed |= set(bank_topics(self.order, t, max(self.bank_sizes)))
        self.adapter_topics = [t for t in self.order if t in needed]
        self.enc, self.val = {}, {}
        for t in self.adapter_topics:
            train = topic_examples(topics, t, "train", seed)
            test = topic_examples(topics, t, "test", seed, limit=budget.profile_eval)
            self.enc[t] = (encode(tok, train, budget.cls_len), encode(tok, test, budget.cls_len))
            if t in self.eval_topics and plan.swept:
                part, held = split_validation(train, plan.validation_fraction, seed, t)
                self.val[t] = (encode(tok, part, budget.cls_len), encode(tok, held, budget.cls_len))
        torch.manual_seed(seed)  # the classifier head's init, the same for every method (as profiles.py's reload)
        self._template = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self._rng_after_load = torch.get_rng_state()
        self.names = xpeft_target_names(self.fresh())
        self.cache = Path(cache) if cache is not None else default_cache(self.settings())
        self.computed, self.reused = 0, 0
        self.reverse = False  # a helper worker takes topics in the opposite order (see `over_eval_topics`)

    def settings(self) -> dict:
        """Everything a cached adapter or run depends on (the cache folder is named after its hash)."""
        b = self.budget
        return {
            "version": CACHE_VERSION,
            "seed": self.seed,
            "budget": {k: getattr(b, k) for k in ("profile_steps", "cls_batch", "cls_len", "profile_eval")},
            "eval_topics": self.plan.eval_topics,
            "validation_fraction": self.plan.validation_fraction,
            "learning_rates": {"adapter": LR_ADAPTER, "lora": LR_LORA, "head": LR_HEAD},
            "hard_k": HARD_K,
        }

    def over_eval_topics(self, run) -> list[dict]:
        """`run(topic)` for every evaluation topic in this worker's order; the results in the topics' order."""
        done = {t: run(t) for t in (self.eval_topics[::-1] if self.reverse else self.eval_topics)}
        return [done[t] for t in self.eval_topics]

    def fresh(self):
        """A copy of the seeded model, with the random state `profiles.py`'s reload leaves: every run draws the same
        adapter inits and dropout masks whatever ran before it in this process (or in the other worker)."""
        model = copy.deepcopy(self._template)
        torch.set_rng_state(self._rng_after_load)
        return model

    def train(self, model, tensors: dict, lr: float, desc: str) -> dict:
        b = self.budget
        log = train_loop(model, tensors, b.profile_steps, b.cls_batch, lr, self.seed, f"bank_size {desc}")
        return {"train_seconds": log["train_seconds"], "first_loss": log["losses"][0], "last_loss": log["losses"][-1]}

    # -- cache -------------------------------------------------------------------------------------------------------
    def cached(self, key: str, compute, expect: dict | None = None) -> dict:
        """The record of run `key` from the cache, or `compute()`'s, written to the cache first. A cached record whose
        fields differ from `expect` (e.g. another bank for the same K) is stale: it is computed again."""
        slug = re.sub(r"[^A-Za-z0-9.=+-]+", "_", key) + "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        path = self.cache / "runs" / f"{slug}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        while not _claim(path.with_suffix(".claim")):
            time.sleep(2)  # another worker (`--jobs 2`) is computing this run: wait for its result
        if path.is_file():
            record = json.loads(path.read_text())
            if all(record.get(f) == v for f, v in (expect or {}).items()):
                path.with_suffix(".claim").unlink()
                self.reused += 1
                return record
        start, load = time.perf_counter(), os.getloadavg()[0]
        try:
            record = {"key": key, **compute()}
            record["seconds"], record["load_average_start"] = time.perf_counter() - start, load
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)
        finally:
            path.with_suffix(".claim").unlink()
        self.computed += 1
        print(f"[bank_size] {key}: {record.get('accuracy', float('nan')):.4f}", flush=True)
        return record

    # -- adapters (bank entries and baselines) -----------------------------------------------------------------------
    def adapter(self, kind: str, topic: str) -> dict:
        """Train (once) `topic`'s bottleneck or LoRA adapter; its record (test accuracy, size, parameters)."""
        return self.cached(f"adapter {kind} {topic}", lambda: self._train_adapter(kind, topic))

    def _bottleneck_file(self, topic: str) -> Path:
        return self.cache / "bottleneck" / f"{topic}.safetensors"

    def _lora_folder(self, topic: str) -> Path:
        return self.cache / "lora" / topic

    def _train_adapter(self, kind: str, topic: str) -> dict:
        train_t, test_t = self.enc[topic]
        model = self.fresh()
        if kind == "bottleneck":
            adapters = add_bottleneck(model, self.names)
            n = sum(p.numel() for p in trainable(model))
            log = self.train(model, train_t, LR_ADAPTER, f"adapter {topic}")
            flat = {f"{name}.{part}": t for name, a in adapters.items() for part, t in a.as_bank_entry().items()}
            head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
            self._bottleneck_file(topic).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in flat.items()}, self._bottleneck_file(topic))
            sizes = {
                "saved_bytes": safetensors_bytes({**flat, **head}),
                "saved_bytes_excl_head": safetensors_bytes(flat),
            }
            lr = LR_ADAPTER
        else:
            model = get_peft_model(model, lora_baseline_config())
            n = sum(p.numel() for p in trainable(model))
            log = self.train(model, train_t, LR_LORA, f"LoRA {topic}")
            model.save_pretrained(self._lora_folder(topic))
            sizes, lr = saved_profile_bytes(model), LR_LORA
        return {"kind": kind, "topic": topic, "lr": lr, "trainable_params": n, **sizes, **log, **score(model, test_t)}

    def bank_entry(self, kind: str, topic: str):
        """`topic`'s adapter in the form `build_bank` takes (trained first if needed)."""
        self.adapter(kind, topic)
        if kind == "lora":
            return str(self._lora_folder(topic))
        entry: dict = {}
        for key, tensor in load_file(self._bottleneck_file(topic)).items():
            name, part = key.rsplit(".", 1)
            entry.setdefault(name, {})[part] = tensor
        return entry

    def bank_file(self, kind: str, topic: str, k: int) -> Path:
        """The bank file of `kind` for evaluation topic `topic` at size `k` (built once)."""
        members = bank_topics(self.order, topic, k)
        digest = hashlib.sha256(",".join(members).encode()).hexdigest()[:8]  # a change of bank order is a new file
        path = self.cache / "banks" / f"{kind}-without-{topic}-{k}-{digest}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            xpeft.build_bank([self.bank_entry(kind, t) for t in members], path)
        return path

    # -- runs ----------------------------------------------------------------------------------------------------------
    def head_only(self, topic: str) -> dict:
        def compute():
            model = self.fresh()
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("classifier."))
            train_t, test_t = self.enc[topic]
            log = self.train(model, train_t, LR_HEAD, f"head only {topic}")
            n, size = sum(p.numel() for p in trainable(model)), tensor_bytes(trainable(model))
            return {"topic": topic, "lr": LR_HEAD, "trainable_params": n, "saved_bytes": size, **log,
                    **score(model, test_t)}  # fmt: skip

        return self.cached(f"head only {topic}", compute)

    def xpeft_run(self, kind: str, mask: str, k: int, lr: float, topic: str, split: str) -> dict:
        """Masks and head trained over the leave-one-out bank; scored on the test split, or (`split='validation'`)
        trained on the training part and scored on the validation part of the training examples."""

        def compute():
            cfg = xpeft.XPeftConfig(
                task_type="SEQ_CLS", bank=str(self.bank_file(kind, topic, k)), bank_size=k, mask_type=mask,
                hard_k=HARD_K,
            )  # fmt: skip
            model = get_peft_model(self.fresh(), cfg)
            train_t, eval_t = self.enc[topic] if split == "test" else self.val[topic]
            log = self.train(model, train_t, lr, f"X-PEFT {kind} {mask} K={k} lr={lr:g} {topic} ({split})")
            cost = xpeft.profile_cost(model)
            return {
                "kind": kind, "mask": mask, "K": k, "lr": lr, "topic": topic, "split": split,
                "bank_topics": bank_topics(self.order, topic, k),
                "trainable_params": sum(p.numel() for p in trainable(model)),
                "payload_bytes": cost["payload_bytes"],
                "saved_bytes_masks": cost["profile_file_bytes"],
                "saved_bytes_with_head": cost["with_head_bytes"],
                **log, **score(model, eval_t),
            }  # fmt: skip

        return self.cached(
            f"xpeft {kind} {mask} K={k} lr={lr:g} {topic} {split}",
            compute,
            {"bank_topics": bank_topics(self.order, topic, k)},
        )

    def mask_lr(self, kind: str, mask: str) -> dict:
        """The mask learning rate of (kind, mask): the best mean validation accuracy at the largest K."""
        k = max(self.bank_sizes)
        if not self.plan.swept:
            return {"kind": kind, "mask": mask, "K": k, "chosen_lr": self.plan.mask_lrs[0], "swept": False,
                    "sweep": []}  # fmt: skip
        sweep = []
        for lr in self.plan.mask_lrs:
            runs = self.over_eval_topics(lambda t: self.xpeft_run(kind, mask, k, lr, t, "validation"))  # noqa: B023
            sweep.append({
                "lr": lr,
                "validation_accuracy": _mean(r["accuracy"] for r in runs),
                "validation_loss": _mean(r["loss"] for r in runs),
                "per_topic": [{"topic": r["topic"], "accuracy": r["accuracy"], "examples": r["examples"]} for r in runs],
            })  # fmt: skip
        return {"kind": kind, "mask": mask, "K": k, "chosen_lr": choose_lr(sweep), "swept": True, "sweep": sweep}


def choose_lr(sweep: list[dict]) -> float:
    """The learning rate of the best mean validation accuracy; a tie goes to the lower validation loss."""
    return max(sweep, key=lambda s: (s["validation_accuracy"], -s["validation_loss"]))["lr"]


def _claim(path: Path) -> bool:
    """Take the claim file `path` for this process; False while a live process holds it (a dead one's is taken)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError, FileNotFoundError):
            path.unlink(missing_ok=True)  # its process died (or it was just released): try again
            return _claim(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def default_cache(settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "xpeft-bank-study" / digest


def _per_topic(runs: list[dict]) -> list[dict]:
    return [{"topic": r["topic"], "accuracy": r["accuracy"], "examples": r["examples"]} for r in runs]


def baseline_rows(study: BankStudy) -> list[dict]:
    rows = []
    for method, runs in (
        ("LoRA r=8", study.over_eval_topics(lambda t: study.adapter("lora", t))),
        ("dedicated adapter", study.over_eval_topics(lambda t: study.adapter("bottleneck", t))),
        ("head only", study.over_eval_topics(study.head_only)),
    ):
        rows.append({
            "method": method,
            "accuracy": _mean(r["accuracy"] for r in runs),
            "per_topic": _per_topic(runs),
            "trainable_params": runs[0]["trainable_params"],
            "saved_bytes": runs[0]["saved_bytes"],
            "saved_bytes_excl_head": runs[0].get("saved_bytes_excl_head", 0),
            "lr": runs[0]["lr"],
        })  # fmt: skip
    return rows


def xpeft_row(study: BankStudy, kind: str, mask: str, k: int, lr: float) -> dict:
    runs = study.over_eval_topics(lambda t: study.xpeft_run(kind, mask, k, lr, t, "test"))
    return {
        "method": "X-PEFT", "kind": kind, "mask": mask, "K": k, "lr": lr,
        "accuracy": _mean(r["accuracy"] for r in runs),
        "per_topic": [{**p, "bank": r["bank_topics"]} for p, r in zip(_per_topic(runs), runs, strict=True)],
        **{f: runs[0][f] for f in ("trainable_params", "payload_bytes", "saved_bytes_masks", "saved_bytes_with_head")},
    }  # fmt: skip


def goals(rows: list[dict], baselines: list[dict]) -> list[dict]:
    """Each X-PEFT row against the issue's goals: accuracy within 3 (soft) / 5 (hard) points of LoRA r=8's mean,
    and at most 1 KB per saved profile (masks only; the head is reported, not counted)."""
    lora = next(b for b in baselines if b["method"] == "LoRA r=8")["accuracy"]
    out = []
    for r in rows:
        gap = 100 * (lora - r["accuracy"])
        limit = GOAL_POINTS[r["mask"]]
        out.append({
            "kind": r["kind"], "mask": r["mask"], "K": r["K"],
            "points_below_lora": gap, "allowed_points": limit, "accuracy_met": gap <= limit,
            "accuracy_missed_by_points": max(0.0, gap - limit),
            "saved_bytes_masks": r["saved_bytes_masks"], "bytes_met": r["saved_bytes_masks"] <= GOAL_BYTES,
            "bytes_over": max(0, r["saved_bytes_masks"] - GOAL_BYTES),
            "saved_bytes_with_head": r["saved_bytes_with_head"],
        })  # fmt: skip
    return out


def run_bank_study(
    budget, plan: BankPlan, seed: int, out: Path, smoke: bool, command: str, cache=None, reverse: bool = False
) -> dict:
    """Run (or resume from the cache) the whole study; write JSON, markdown and plot after each group of runs."""
    from .evaluate import machine_info

    started, start, load = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter(), os.getloadavg()
    study = BankStudy(budget, plan, seed, cache)
    machine = machine_info()
    res = {
        "meta": {
            "command": command,
            "smoke": smoke,
            "seed": seed,
            "settings": study.settings(),
            "plan": asdict(plan),
            "bank_sizes": study.bank_sizes,
            "bank_sizes_note": _bank_sizes_note(plan, study),
            "usable_topics": study.usable,
            "bank_only_topics": study.bank_only,
            "eval_topics": study.eval_topics,
            "bank_order": study.order,
            "banks": {t: {k: bank_topics(study.order, t, k) for k in study.bank_sizes} for t in study.eval_topics},
            "hard_k": HARD_K,
            "setting": "MiniLM one-vs-rest chatterbot topic detection (profiles.py's task); masks and head train, "
            "the bank is frozen; the head trains at the mask learning rate",
            "cache": str(study.cache),
            "machine": machine,
        },
        "complete": False,
    }
    paths = _paths(out, smoke)

    def write():
        res["run"] = {
            "command": command, "started_utc": started, "seconds": time.perf_counter() - start,
            "load_average_start": list(load), "load_average_end": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(), "git_commit": machine["git_commit"],
            "runs_computed": study.computed, "runs_from_cache": study.reused,
        }  # fmt: skip
        write_outputs(res, paths)

    # One bank kind after the other (its adapters, then its rows), the baselines after the first kind's adapters, so
    # that an unfinished run holds whole curves. A helper worker (`reverse`) takes the adapters and the topics of each
    # row in the opposite order; the two meet through the cache.
    study.reverse = reverse
    res["mask_lr"], res["rows"] = [], []
    # The largest bank first (the goals are judged there), then the smallest.
    sizes = sorted(study.bank_sizes, key=lambda k: (k != max(study.bank_sizes), k))
    for kind in KINDS:
        adapters = [(kind, t) for t in study.adapter_topics]
        for _, t in reversed(adapters) if reverse else adapters:
            study.adapter(kind, t)
        if "baselines" not in res:
            res["baselines"] = baseline_rows(study)
        choices = {mask: study.mask_lr(kind, mask) for mask in MASKS}
        res["mask_lr"] += choices.values()
        for k, mask in [(k, mask) for k in sizes for mask in MASKS]:
            res["rows"].append(xpeft_row(study, kind, mask, k, choices[mask]["chosen_lr"]))
            res["rows"].sort(key=lambda r: (KINDS.index(r["kind"]), MASKS.index(r["mask"]), r["K"]))
            res["goals"] = goals(res["rows"], res["baselines"])
            write()
    res["bank_adapters"] = [study.adapter(kind, t) for kind in KINDS for t in study.adapter_topics]
    res["complete"] = True
    write()
    return res


def _bank_sizes_note(plan: BankPlan, study: BankStudy) -> str:
    if study.bank_sizes == sorted(plan.bank_sizes):
        return "as requested"
    return (
        f"requested {list(plan.bank_sizes)}; {len(study.order)} topics with a bank adapter leave at most "
        f"{len(study.order) - 1} adapters in a leave-one-out bank, so the sizes are {study.bank_sizes}"
    )


def _paths(out: Path, smoke: bool) -> dict[str, Path]:
    stem = "bank_size_smoke" if smoke else "bank_size"
    return {ext: Path(out) / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def write_outputs(res: dict, paths: dict[str, Path]) -> None:
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    res["meta"]["plots"] = render_plot(res, paths["png"])
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(paths["json"])
    paths["md"].write_text(render_markdown(res, paths["json"].name))


# -- rendering ---------------------------------------------------------------------------------------------------------
def _kb(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else f"{n / 1000:.1f} KB"


def render_markdown(res: dict, json_name: str = "bank_size.json") -> str:
    meta, run = res["meta"], res.get("run", {})
    s = meta["settings"]
    out = [
        "# X-PEFT bank size and quality (issue 17, item 2)",
        "",
        f"{meta['setting']}. {s['budget']['profile_steps']} steps × batch {s['budget']['cls_batch']}, "
        f"{s['budget']['cls_len']} tokens, seed {meta['seed']}, the same batch order for every method; held-out "
        f"test examples of each evaluation topic ({', '.join(meta['eval_topics'])}), at most "
        f"{s['budget']['profile_eval']} per topic. Bank sizes: {meta['bank_sizes']} ({meta['bank_sizes_note']}); "
        f"hard masks with hard_k = {meta['hard_k']}. Every number is in `{json_name}`.",
        "",
    ]
    if run:
        out += [
            f"Run: `{run['command']}` at {run['started_utc']}, {run['seconds']:.0f} s, {run['torch_threads']} torch "
            f"thread(s), load average {run['load_average_start'][0]:.1f} → {run['load_average_end'][0]:.1f}, commit "
            f"`{run['git_commit'][:10]}`; {run['runs_computed']} runs trained in this run, {run['runs_from_cache']} "
            "read from the cache." + ("" if res.get("complete") else " **Incomplete: the run stopped early.**"),
            "",
        ]
    out += [
        "Bank order (a topic's bank is the first K of these, itself left out): " + ", ".join(meta["bank_order"]),
        "",
    ]
    if res.get("mask_lr"):
        out += ["Mask learning rate per (kind, mask), chosen at the largest K on the validation split:", ""]
        for c in res["mask_lr"]:
            if not c["swept"]:
                out.append(f"- {c['kind']} {c['mask']}: {c['chosen_lr']:g} (not swept)")
                continue
            tried = ", ".join(f"{e['lr']:g}: {e['validation_accuracy']:.3f}" for e in c["sweep"])
            out.append(f"- {c['kind']} {c['mask']}: **{c['chosen_lr']:g}** (validation accuracy {tried})")
        out.append("")
    out += results_table(res)
    if meta.get("plots"):
        out += ["", *(f"![{name.removesuffix('.png')}]({name})" for name in meta["plots"])]
    return "\n".join(out) + "\n"


def results_table(res: dict) -> list[str]:
    """The rows and the goals, as markdown lines (the markdown file and the README block share them)."""
    meta, out = res["meta"], []
    topics = meta["eval_topics"]
    lora = next((b["accuracy"] for b in res.get("baselines", []) if b["method"] == "LoRA r=8"), None)
    out += [
        "| method | kind | mask | K | mean acc | vs LoRA r=8 (points) | "
        + " | ".join(topics)
        + " | trainable params | "
        "bytes / profile: masks (with head) | lr |",
        "|---|---|---|---|---|---|" + "---|" * len(topics) + "---|---|---|",
    ]
    for r in res.get("rows", []):
        diff = f"{100 * (r['accuracy'] - lora):+.1f}" if lora is not None else "–"
        accs = " | ".join(f"{p['accuracy']:.3f}" for p in r["per_topic"])
        out.append(
            f"| X-PEFT | {r['kind']} | {r['mask']} | {r['K']} | {r['accuracy']:.4f} | {diff} | {accs} | "
            f"{r['trainable_params']:,} | {_kb(r['saved_bytes_masks'])} ({_kb(r['saved_bytes_with_head'])}) | "
            f"{r['lr']:g} |"
        )
    for b in res.get("baselines", []):
        diff = f"{100 * (b['accuracy'] - lora):+.1f}" if lora is not None else "–"
        accs = " | ".join(f"{p['accuracy']:.3f}" for p in b["per_topic"])
        masks = _kb(b["saved_bytes_excl_head"]) if b["method"] != "head only" else "0 B"
        out.append(
            f"| {b['method']} | – | – | – | {b['accuracy']:.4f} | {diff} | {accs} | {b['trainable_params']:,} | "
            f"{masks} ({_kb(b['saved_bytes'])}) | {b['lr']:g} |"
        )
    if res.get("goals"):
        out += ["", "Goals (soft masks within 3 points of LoRA r=8's mean accuracy, hard masks within 5, at most "
                "1 KB per profile without the head):", ""]  # fmt: skip
        for g in res["goals"]:
            acc = f"{g['points_below_lora']:.2f} points below LoRA r=8: " + (
                "met" if g["accuracy_met"] else f"**missed by {g['accuracy_missed_by_points']:.2f} points**"
            )
            size = f"{g['saved_bytes_masks']:,} B: " + (
                "met" if g["bytes_met"] else f"**missed by {g['bytes_over']:,} B**"
            )
            out.append(
                f"- {g['kind']} {g['mask']}, K = {g['K']}: accuracy {acc}; size {size} "
                f"({g['saved_bytes_with_head']:,} B with the head)"
            )
    return out


def render_readme_block(res: dict) -> str:
    """The README's bank-size block: the run, the table and the goals, generated from `bank_size.json`."""
    run = res["run"]
    lines = [
        README_BEGIN,
        "",
        f"Generated from `results/bank_size.json` (`{run['command']}`, {run['seconds'] / 60:.0f} min, "
        f"{run['torch_threads']} torch thread, load average {run['load_average_start'][0]:.1f} → "
        f"{run['load_average_end'][0]:.1f}, commit `{run['git_commit'][:10]}`"
        + ("" if res.get("complete") else "; **incomplete run**")
        + f"). Bank sizes {res['meta']['bank_sizes']}: {res['meta']['bank_sizes_note']}.",
        "",
        *results_table(res),
        "",
        README_END,
    ]
    return "\n".join(lines)


def update_readme(path: Path, res: dict) -> None:
    text = Path(path).read_text()
    start = text.find(README_BEGIN)
    end = text.find(README_END, max(start, 0))
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill; add the two markers first.")
    Path(path).write_text(text[:start] + render_readme_block(res) + text[end + len(README_END) :])


def render_plot(res: dict, path: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not res.get("rows"):
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (kind, mask) in enumerate((k, m) for k in KINDS for m in MASKS):
        pts = sorted((r["K"], r["accuracy"]) for r in res["rows"] if r["kind"] == kind and r["mask"] == mask)
        if pts:
            ax.plot(*zip(*pts, strict=True), "-o" if mask == "soft" else "--s", color=f"C{i}", label=f"{kind} {mask}")
    for j, b in enumerate(res.get("baselines", [])):
        ax.axhline(b["accuracy"], color=f"C{4 + j}", linestyle=":", label=f"{b['method']} ({b['accuracy']:.3f})")
    sizes = res["meta"]["bank_sizes"]
    ax.set(xscale="log", xlabel="adapters in the bank (K)", ylabel="mean held-out accuracy",
           title="X-PEFT on MiniLM, chatterbot topics: accuracy vs bank size")  # fmt: skip
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def main(argv=None) -> None:
    """Re-render `bank_size.md`, `.png` and the README block from a finished `bank_size.json` (no training)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "bank_size.json")
    parser.add_argument("--readme", type=Path, default=None, help="also regenerate this README's bank_size block")
    args = parser.parse_args(argv)
    res = json.loads(args.json.read_text())
    write_outputs(res, {ext: args.json.with_suffix(f".{ext}") for ext in ("json", "md", "png")})
    if args.readme:
        update_readme(args.readme, res)


if __name__ == "__main__":
    main()
