"""Training and scoring helpers shared by the evaluation tasks (`evaluate.py`, `profiles.py`, `bench_*.py`).

Every method in a task trains through `train_loop` on the batches `batches` draws from one seed, so methods differ
only in what they train.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def saved_profile_bytes(model) -> dict:
    """Bytes on disk of what ``save_pretrained`` writes for one adapter, and the share that is not the task head."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        path = Path(tmp) / "adapter_model.safetensors"
        total = path.stat().st_size
        head = 0
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if "classifier" in key or ".score." in key:
                    t = f.get_tensor(key)
                    head += t.numel() * t.element_size()
    return {"saved_bytes": total, "saved_bytes_excl_head": total - head}


def tensor_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def batches(n: int, batch: int, steps: int, seed: int):
    """Deterministic batch indices (epochs of a seeded permutation), identical for every method."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch]
        order = order[batch:]


def train_loop(model, tensors: dict, budget_steps: int, batch: int, lr: float, seed: int, desc: str) -> dict:
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    n = len(next(iter(tensors.values())))
    start = time.perf_counter()
    for idx in tqdm(batches(n, batch, budget_steps, seed), total=budget_steps, desc=desc, leave=False):
        out = model(**{k: v[idx] for k, v in tensors.items()})
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return {"train_seconds": time.perf_counter() - start, "losses": losses}


def f1_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    return {"accuracy": float((pred == labels).float().mean()), "f1": 2 * tp / max(1, 2 * tp + fp + fn)}
