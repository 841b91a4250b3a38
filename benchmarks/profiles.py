"""Task "profiles" of the evaluation suite: X-PEFT's own setting, many profiles on one frozen MiniLM.

Each chatterbot topic is a profile with its own small task, one-vs-rest topic detection: MiniLM reads
``[CLS] prompt [SEP] answer [SEP]`` and says whether the exchange belongs to the profile's topic. Positives are the
topic's pairs; negatives are as many pairs drawn round robin from the other topics of the same split (fixed seed), so
chance is 0.5; a test example never shares its prompt with a training pair (see [`topic_examples`]).

1. Ordinary bottleneck adapters (Pfeiffer: ``h + B f(A h + a) + b`` on each FFN output, the layers X-PEFT adapts)
   are trained on ``profile_bank_topics`` topics, one per topic, and stacked into a bank with ``xpeft.build_bank``.
   Topics are ranked by distinct pairs: the largest ``profile_bank_topics`` are the new profiles (the largest test
   sets), the next ones train the bank.
2. Every new-profile topic is trained four ways, same steps and data: X-PEFT soft and hard masks over that trained
   bank (only the masks and the head train), a dedicated bottleneck adapter, and peft LoRA r=8 on query/value.

Reported per method: mean held-out accuracy over the remaining topics, bytes per saved profile (with and without the
per-profile classifier head) and trainable parameters per profile.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

import xpeft

from . import data
from .training import f1_accuracy, saved_profile_bytes, train_loop

MIN_TRAIN_PAIRS, MIN_TEST_PAIRS = 10, 3
LR_ADAPTER, LR_MASK, LR_LORA = 1e-3, 1e-2, 1e-3
"""Learning rates of the bottleneck adapters, of the X-PEFT masks (and head) and of LoRA r=8."""


def _trainable_topics(topics: dict, scorable: bool) -> list[str]:
    """Topics with at least `MIN_TRAIN_PAIRS` distinct training pairs whose distinct test pairs reach
    `MIN_TEST_PAIRS` (`scorable`) or do not; largest (most distinct training pairs) first, ties by name."""
    distinct = {t: {part: len(set(pairs)) for part, pairs in topics[t].items()} for t in topics}
    return [t for t in sorted(topics, key=lambda t: (-distinct[t]["train"], t))
            if distinct[t]["train"] >= MIN_TRAIN_PAIRS and (distinct[t]["test"] >= MIN_TEST_PAIRS) == scorable]  # fmt: skip


def usable_topics(topics: dict) -> list[str]:
    """Topics that can train an adapter and be scored: new profiles or bank entries."""
    return _trainable_topics(topics, scorable=True)


def bank_only_topics(topics: dict) -> list[str]:
    """Topics with enough training pairs for an adapter but too few test pairs to be scored: they can fill a bank,
    never be a new profile."""
    return _trainable_topics(topics, scorable=False)


def lora_baseline_config() -> LoraConfig:
    """The LoRA r=8 baseline: peft LoRA on MiniLM's query and value projections."""
    return LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])


class BottleneckAdapter(nn.Module):
    """``y = W x + c`` followed by ``y + B relu(A y + a) + b`` (Pfeiffer adapter on the FFN output, as in X-PEFT).

    ``B`` and ``b`` start at zero, so the model starts unchanged (the usual adapter init).
    """

    def __init__(self, base: nn.Linear, reduction_factor: int = 16):
        super().__init__()
        d = base.out_features
        r = d // reduction_factor
        self.base = base
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.base(x)
        return h + self.up(torch.relu(self.down(h)))

    def as_bank_entry(self) -> dict[str, torch.Tensor]:
        return {
            "A": self.down.weight.detach().clone(),
            "a": self.down.bias.detach().clone(),
            "B": self.up.weight.detach().clone(),
            "b": self.up.bias.detach().clone(),
        }


def topic_examples(topics: dict, topic: str, split: str, seed: int, limit: int | None = None) -> list[tuple]:
    """Balanced one-vs-rest examples `(prompt, answer, label)` of `topic` from one split, seeded.

    Positives are the topic's pairs (label 1); negatives (label 0) are as many pairs of the other topics, drawn round
    robin across those topics so that no large topic dominates them. The corpus repeats some prompts across topics
    ("Hello" is in greetings and conversations), so a negative never shares a prompt with the topic, and test
    examples never share a prompt with any training pair; repeated pairs count once. `limit` caps the number of examples (half of each label).
    """
    rng = random.Random(f"{seed}-{topic}-{split}")
    own_prompts = {p for part in ("train", "test") for p, _ in topics[topic][part]}
    seen_in_train = {p for t in topics for p, _ in topics[t]["train"]} if split == "test" else set()
    positives = [pair for pair in dict.fromkeys(topics[topic][split]) if pair[0] not in seen_in_train]
    pools = []
    for other in sorted(topics):
        pool = [
            p
            for p in dict.fromkeys(topics[other][split])
            if other != topic and p[0] not in own_prompts | seen_in_train
        ]
        rng.shuffle(pool)
        pools.append(pool)
    negatives = list(dict.fromkeys(pair for round_ in itertools.zip_longest(*pools) for pair in round_ if pair))
    n = min(len(positives), len(negatives), limit // 2 if limit else len(positives))
    positives = rng.sample(positives, n)
    return [(p, a, 1) for p, a in positives] + [(p, a, 0) for p, a in negatives[:n]]


def encode(tok, triples, max_len):
    enc = tok(
        [p for p, _, _ in triples],
        [a for _, a, _ in triples],
        truncation=True,
        max_length=max_len,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([y for _, _, y in triples]),
    }


def xpeft_target_names(model) -> list[str]:
    """Module paths X-PEFT adapts by default on this model (its layer names, the keys of a bank)."""
    probe = get_peft_model(_clone_base(model), xpeft.XPeftConfig(task_type="SEQ_CLS", bank_size=1))
    return sorted(layer.layer_name for layer in probe.modules() if isinstance(layer, xpeft.x_peft.XPeftLayer))


def _clone_base(model):
    import copy

    return copy.deepcopy(model)


def add_bottleneck(model, names, reduction_factor=16):
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name in names:
        parent, child = name.rsplit(".", 1)
        holder = model.get_submodule(parent)
        adapters[name] = BottleneckAdapter(getattr(holder, child), reduction_factor)
        setattr(holder, child, adapters[name])
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return adapters


def safetensors_bytes(tensors: dict) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)
        return path.stat().st_size


def task_profiles(budget, seed: int) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not hasattr(xpeft, "XPeftConfig"):
        return {
            "setting": "not run",
            "rows": [],
            "skipped": [{"method": "all", "reason": "xpeft.XPeftConfig missing"}],
        }
    path = data.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    topics = data.chatterbot(seed=seed)
    usable = usable_topics(topics)
    k = budget.profile_bank_topics
    # The largest topics are the new profiles (the largest test sets); the next ones train the bank.
    eval_topics, bank_topics = usable[:k], usable[k : 2 * k]
    enc = {}
    for t in bank_topics + eval_topics:
        enc[t] = (
            encode(tok, topic_examples(topics, t, "train", seed), budget.cls_len),
            encode(tok, topic_examples(topics, t, "test", seed, limit=budget.profile_eval), budget.cls_len),
        )

    def fresh():
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def evaluate(model, test_t):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=test_t["input_ids"], attention_mask=test_t["attention_mask"]).logits
        return f1_accuracy(logits.argmax(-1), test_t["labels"])["accuracy"]

    names = xpeft_target_names(fresh())
    lr_adapter, lr_mask, lr_lora = LR_ADAPTER, LR_MASK, LR_LORA

    def train_bottleneck(topic):
        model = fresh()
        adapters = add_bottleneck(model, names)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train_loop(model, enc[topic][0], budget.profile_steps, budget.cls_batch, lr_adapter, seed, f"adapter {topic}")
        entry = {name: a.as_bank_entry() for name, a in adapters.items()}
        flat = {f"{name}.{part}": t for name, e in entry.items() for part, t in e.items()}
        head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
        cost = {
            "trainable_params": n,
            "saved_bytes": safetensors_bytes({**flat, **head}),
            "saved_bytes_excl_head": safetensors_bytes(flat),
        }
        return model, entry, cost

    bank_entries = []
    for t in tqdm(bank_topics, desc="profiles: bank adapters"):
        model, entry, _ = train_bottleneck(t)
        bank_entries.append(entry)
    results = {
        m: [] for m in ("X-PEFT soft (trained bank)", "X-PEFT hard (trained bank)", "dedicated adapter", "LoRA r=8")
    }
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        bank_path = str(Path(tmp) / "bank.safetensors")
        fingerprint = xpeft.build_bank(bank_entries, bank_path)
        for t in tqdm(eval_topics, desc="profiles: new topics"):
            for mask_type in ("soft", "hard"):
                name = f"X-PEFT {mask_type} (trained bank)"
                # hard_k=1: the bank holds only `profile_bank_topics` adapters, fewer than the default k of 32.
                cfg = xpeft.XPeftConfig(
                    task_type="SEQ_CLS", bank=bank_path, bank_size=len(bank_entries), mask_type=mask_type, hard_k=1
                )
                model = get_peft_model(fresh(), cfg)
                train_loop(model, enc[t][0], budget.profile_steps, budget.cls_batch, lr_mask, seed, f"{name} {t}")
                results[name].append({"topic": t, "accuracy": evaluate(model, enc[t][1])})
                cost = xpeft.profile_cost(model)
                costs[name] = {
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "saved_bytes": cost["with_head_bytes"],
                    "saved_bytes_excl_head": cost["profile_file_bytes"],
                }
            model, _, costs["dedicated adapter"] = train_bottleneck(t)
            results["dedicated adapter"].append({"topic": t, "accuracy": evaluate(model, enc[t][1])})
            model = get_peft_model(fresh(), lora_baseline_config())
            train_loop(model, enc[t][0], budget.profile_steps, budget.cls_batch, lr_lora, seed, f"LoRA {t}")
            results["LoRA r=8"].append({"topic": t, "accuracy": evaluate(model, enc[t][1])})
            costs["LoRA r=8"] = {
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                **saved_profile_bytes(model),
            }
    rows = []
    for name, per_topic in results.items():
        rows.append(
            {
                "method": name,
                "accuracy": sum(r["accuracy"] for r in per_topic) / len(per_topic),
                "per_topic": per_topic,
                **costs[name],
            }
        )
    return {
        "setting": f"MiniLM one-vs-rest topic detection; bank of {len(bank_entries)} adapters from topics "
        f"{', '.join(bank_topics)}; new topics {', '.join(eval_topics)}; {budget.profile_steps} steps each",
        "bank_fingerprint": fingerprint,
        "bank_topics": bank_topics,
        "eval_topics": eval_topics,
        "learning_rates": {"adapter": lr_adapter, "masks": lr_mask, "lora": lr_lora},
        "rows": rows,
        "skipped": [],
    }
