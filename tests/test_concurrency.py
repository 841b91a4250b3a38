"""Concurrency stress: one model serves 8 threads at once, each with its own mixed-adapter requests.

Every output must equal the single-threaded result of the same request, exactly: a request that sees another
thread's routing (`adapter_names`), prompt mask or PEDRO vectors gives another output, and any error counts too.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from peft import get_peft_model

from models import make_inputs, make_model
from xpeft import EtherConfig, PedroConfig, XPeftConfig

THREADS = 8
REQUESTS_PER_THREAD = 200
ADAPTERS = ("a", "b", "c")


def randomized(model, seed=0, std=0.3):
    """Move every adapter parameter of `model` away from its init, so that adapters differ from each other."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or any(tag in name for tag in ("pedro_", "ether_", "xpeft_")):
                param.add_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


def with_adapters(base, config_of):
    model = get_peft_model(base, config_of(ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config_of(name))
    return randomized(model)


def mixed_names(rng: random.Random, batch: int) -> list[str]:
    return [rng.choice((*ADAPTERS, "__base__")) for _ in range(batch)]


def pedro_requests():
    model = with_adapters(make_model("llama"), lambda _: PedroConfig(vg_rank=4, task_type="CAUSAL_LM"))
    rng, requests = random.Random(0), []
    for i in range(12):
        inputs = make_inputs("llama", batch=3, seq_len=6 + i % 4, seed=10 + i)
        inputs.pop("labels", None)
        names = mixed_names(rng, 3)
        if i % 3 == 0:
            requests.append(("generate", dict(inputs, adapter_names=names)))
        elif i % 3 == 1:
            lengths = torch.tensor([rng.randint(1, int(n)) for n in inputs["attention_mask"].sum(1)])
            requests.append(("forward", dict(inputs, adapter_names=names, prompt_lengths=lengths)))
        else:
            requests.append(("forward", dict(inputs, adapter_names=names)))
    return model, requests


def xpeft_requests():
    config = XPeftConfig(bank_size=4, reduction_factor=4, task_type="SEQ_CLS", init_weights=False)
    model = with_adapters(make_model("bert"), lambda _: config)
    rng = random.Random(1)
    return model, [
        (
            "forward",
            dict(make_inputs("bert", batch=4, seq_len=5 + i % 3, seed=20 + i), adapter_names=mixed_names(rng, 4)),
        )
        for i in range(12)
    ]


def ether_requests():
    variants = dict(zip(ADAPTERS, ("ether", "ether_plus", "ether_plus_one_sided"), strict=True))
    model = with_adapters(
        make_model("llama"),
        lambda name: EtherConfig(target_modules="all-linear", n_blocks=4, variant=variants[name], init_weights=False),
    )
    rng = random.Random(2)
    requests = []
    for i in range(12):
        inputs = make_inputs("llama", batch=3, seq_len=6 + i % 4, seed=30 + i)
        inputs.pop("labels", None)
        requests.append(("forward", dict(inputs, adapter_names=mixed_names(rng, 3))))
    return model, requests


def run(model, kind: str, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        if kind == "generate":
            return model.generate(**kwargs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        return model(**kwargs).logits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pedro", "xpeft", "ether"])
def test_threads_each_get_their_single_threaded_result(method):
    model, requests = {"pedro": pedro_requests, "xpeft": xpeft_requests, "ether": ether_requests}[method]()
    expected = [run(model, kind, kwargs) for kind, kwargs in requests]
    assert len({tuple(e.flatten().tolist()) for e in expected}) == len(expected)  # the requests are distinguishable
    mismatches, errors = [], []
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        rng = random.Random(100 + thread)
        start.wait()
        for step in range(REQUESTS_PER_THREAD):
            index = rng.randrange(len(requests))
            kind, kwargs = requests[index]
            try:
                output = run(model, kind, kwargs)
            except Exception as error:  # noqa: BLE001 - every failure is collected and reported below
                errors.append(f"thread {thread} step {step} request {index}: {type(error).__name__}: {error}")
                continue
            if output.shape != expected[index].shape or not torch.equal(output, expected[index]):
                mismatches.append((thread, step, index))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} errors, first: {errors[0]}"
    assert not mismatches, (
        f"{len(mismatches)} of {THREADS * REQUESTS_PER_THREAD} outputs differ, first: {mismatches[0]}"
    )
