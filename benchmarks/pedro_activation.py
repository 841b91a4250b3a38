"""PEDRO's rational activation on the evaluation's instruction task: (5, 4) joint, (6, 5) joint, (6, 5) bi-level.

SmolLM2-135M-Instruct on the chatterbot pairs of `evaluate.py`'s instruct task (same tokenisation, 80 tokens, loss on
the answer only, batch 4, AdamW lr 3e-3 as evaluate's PEDRO row, the batch order of `training.batches`). A seeded 10%
of the training pairs is set aside as the held-out split of bi-level training; every variant trains on the other 90%
with the same batches, so the variants differ only in the activation and in how its coefficients learn. Bi-level:
the coefficients are out of AdamW, and after every step one held-out batch (batch 4, in order, cycled) updates them
with Adam at 1e-6 (`xpeft.pedro.activation_step`). Scored by the mean answer-token cross-entropy on the instruct
task's held-out test pairs (PEDRO pools each test prompt only: labels mark it).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.pedro_activation --threads 1 [--steps 40] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from itertools import cycle
from pathlib import Path

import torch
from peft import get_peft_model

from xpeft import PedroConfig
from xpeft.pedro import activation_step, rational_coefficients
from xpeft.pedro.bilevel import coefficients_trainable

from . import data
from .evaluate import FULL, answer_loss, encode_chat, instruct_pairs
from .training import batches, set_threads

RESULTS = Path(__file__).resolve().parent / "results" / "pedro_activation.json"
VARIANTS = {
    "(5, 4) joint": ((5, 4), False),
    "(6, 5) joint": ((6, 5), False),
    "(6, 5) bi-level": ((6, 5), True),
}
LR, ACTIVATION_LR, HELD_OUT_SHARE = 3e-3, 1e-6, 0.1


def split_train(train: list, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    cut = int(len(train) * HELD_OUT_SHARE)
    return [train[i] for i in order[cut:]], [train[i] for i in order[:cut]]


def run(variant: str, load, train_t, held_t, test_t, steps: int, seed: int) -> dict:
    degrees, bilevel = VARIANTS[variant]
    model = get_peft_model(load(), PedroConfig(task_type="CAUSAL_LM", rational_degrees=degrees))
    coefficients = rational_coefficients(model)
    start_coefficients = torch.cat([p.detach().flatten() for p in coefficients]).clone()
    excluded = {id(p) for p in coefficients} if bilevel else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    held_opt = torch.optim.Adam(coefficients, lr=ACTIVATION_LR)
    held = cycle(range(0, len(held_t["labels"]) - 3, 4))
    model.train()
    losses, held_losses = [], []
    start = time.perf_counter()
    # Bi-level: the training batches give the coefficients no gradient (activation_step turns it on for its own pass).
    with coefficients_trainable(coefficients, not bilevel):
        for idx in batches(len(train_t["labels"]), FULL.lm_batch, steps, seed):
            out = model(**{k: v[idx] for k, v in train_t.items()})
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if bilevel:
                i = next(held)
                part = {k: v[i : i + 4] for k, v in held_t.items()}
                held_losses.append(
                    float(activation_step(lambda part=part: model(**part).loss, coefficients, held_opt))
                )
    seconds = time.perf_counter() - start
    end_coefficients = torch.cat([p.detach().flatten() for p in coefficients])
    return {
        "variant": variant,
        "rational_degrees": list(degrees),
        "bilevel": bilevel,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "coefficients": len(start_coefficients),
        "coefficient_change_max": float((end_coefficients - start_coefficients).abs().max()),
        "train_seconds": seconds,
        "train_losses": losses,
        "held_out_losses": held_losses,
        "test_answer_loss": answer_loss(model, test_t)["answer_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=FULL.lm_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    set_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    _, train, test = instruct_pairs(FULL, args.seed)
    train, held_out = split_train(train, args.seed)
    train_t, held_t, test_t = (encode_chat(tok, pairs, FULL.lm_len) for pairs in (train, held_out, test))

    def load():
        torch.manual_seed(args.seed)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    report = {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.pedro_activation "
        + f"--threads {args.threads} --steps {args.steps} --seed {args.seed} --variants "
        + " ".join(repr(v) for v in args.variants),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
        "data": {"train_pairs": len(train), "held_out_pairs": len(held_out), "test_pairs": len(test),
                 "max_len": FULL.lm_len, "batch": FULL.lm_batch},
        "lr": LR,
        "activation_lr": ACTIVATION_LR,
        "steps": args.steps,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "note": "other agents' jobs shared the 2 CPU cores: seconds are indicative only",
        "rows": [],
    }  # fmt: skip
    base = load()
    report["base_test_answer_loss"] = answer_loss(base, test_t)["answer_loss"]
    for variant in args.variants:
        row = run(variant, load, train_t, held_t, test_t, args.steps, args.seed)
        row["test_answer_ppl"] = math.exp(row["test_answer_loss"])
        report["rows"].append(row)
        print(
            variant, {k: row[k] for k in ("test_answer_loss", "train_seconds", "coefficient_change_max")}, flush=True
        )
        report["loadavg_after"] = os.getloadavg()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
