"""X-PEFT against independent float64 math: soft/hard composition, straight-through gradients, training, bank seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from models import make_inputs, make_model, task_type
from xpeft import XPeftConfig
from xpeft.x_peft.model import xpeft_layers

TESTS_DIR = Path(__file__).resolve().parent
N, K = 7, 3


def build(model_name: str, mask_type: str, seed: int = 0, **kwargs):
    config = XPeftConfig(
        bank_size=N, reduction_factor=4, mask_type=mask_type, hard_k=K, init_weights=False,
        task_type=task_type(model_name), **kwargs,
    )  # fmt: skip
    torch.manual_seed(seed)
    return get_peft_model(make_model(model_name), config)


def reference_weights(logits: torch.Tensor, mask_type: str) -> torch.Tensor:
    """Float64 mixing weights written out: softmax, or a 0/1 mask on the K largest logits divided by K."""
    logits = logits.double()
    if mask_type == "soft":
        e = torch.exp(logits - logits.max())
        return e / e.sum()
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    mask = torch.zeros_like(logits)
    for i in order[:K]:
        mask[i] = 1.0
    return mask / K


REFERENCE_ACTIVATIONS = {
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
}


def reference_logits(peft_model, model_name: str, mask_type: str, inputs, activation="relu") -> torch.Tensor:
    """The base model in float64 with, after each adapted layer, h + B* f(A* h + a*) + b* from explicit sums."""
    f = REFERENCE_ACTIVATIONS[activation]
    base = make_model(model_name).double()
    modules = dict(base.named_modules())
    handles = []
    for _, layer in xpeft_layers(peft_model, "default"):
        A, a, B, b = (t.double() for t in layer.xpeft_bank.layer(layer.layer_name))
        wA = reference_weights(layer.xpeft_mask_A["default"].detach(), mask_type)
        wB = reference_weights(layer.xpeft_mask_B["default"].detach(), mask_type)
        A_s, a_s = sum(wA[i] * A[i] for i in range(N)), sum(wA[i] * a[i] for i in range(N))
        B_s, b_s = sum(wB[j] * B[j] for j in range(N)), sum(wB[j] * b[j] for j in range(N))

        def hook(module, args, h, A_s=A_s, a_s=a_s, B_s=B_s, b_s=b_s):
            return h + f(h @ A_s.T + a_s) @ B_s.T + b_s

        handles.append(modules[layer.layer_name].register_forward_hook(hook))
    with torch.no_grad():
        out = base(**inputs).logits
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_output_matches_float64_reference(model_name, mask_type):
    inputs = make_inputs(model_name)
    model = build(model_name, mask_type).eval()
    # copy the (random) classifier head of the peft model into the reference via the same seeded base model
    with torch.no_grad():
        got = model(**inputs).logits.double()
    expected = reference_logits(model, model_name, mask_type, inputs)
    base = make_model(model_name)(**inputs).logits.double()
    assert not torch.allclose(expected, base, atol=1e-3), "the reference adapter must have a visible effect"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_non_linearity_matches_float64_reference(activation):
    inputs = make_inputs("llama")
    model = build("llama", "soft", non_linearity=activation).eval()
    with torch.no_grad():
        got = model(**inputs).logits.double()
    torch.testing.assert_close(got, reference_logits(model, "llama", "soft", inputs, activation), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_default_init(mask_type):
    """Soft masks start as the uniform mix of the bank; hard masks start with k distinct picks from small noise."""
    config = XPeftConfig(bank_size=N, reduction_factor=4, mask_type=mask_type, hard_k=K)
    model = get_peft_model(make_model("llama"), config).eval()
    for _, layer in xpeft_layers(model, "default"):
        logits = layer.xpeft_mask_A["default"].detach()
        if mask_type == "soft":
            assert torch.equal(logits, torch.zeros(N))
        else:
            assert 0 < logits.abs().max() < 0.1 and len(set(logits.tolist())) == N
    inputs = make_inputs("llama")
    with torch.no_grad():
        got = model(**inputs).logits.double()
    torch.testing.assert_close(got, reference_logits(model, "llama", mask_type, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_cached_adapter_follows_mask_edits_through_data(mask_type):
    """Writes through `param.data` do not bump `_version`: the composed-adapter caches must still see them."""
    model = build("llama", mask_type).eval()
    inputs = make_inputs("llama")
    batch = len(inputs["input_ids"])
    with torch.no_grad():  # fill the single-profile and the mixed-batch caches
        model(**inputs)
        model(**inputs, adapter_names=["default"] * batch)
    generator = torch.Generator().manual_seed(1)
    for _, layer in xpeft_layers(model, "default"):
        for mask in (layer.xpeft_mask_A["default"], layer.xpeft_mask_B["default"]):
            mask.data.copy_(torch.randn(N, generator=generator) * 3)  # new values, and a new top-k
    expected = reference_logits(model, "llama", mask_type, inputs)
    with torch.no_grad():
        got = model(**inputs).logits.double()
        mixed = model(**inputs, adapter_names=["default"] * batch).logits.double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)


def test_half_precision_model_runs_with_the_bank_cast_along():
    model = build("llama", "soft").to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(**make_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.cuda
def test_random_bank_is_identical_on_cuda():
    cpu = build("gpt2", "soft").base_model.xpeft_bank.layer_tensors()
    cuda_model = get_peft_model(make_model("gpt2").cuda(), XPeftConfig(bank_size=N, reduction_factor=4))
    for name, parts in cuda_model.base_model.xpeft_bank.layer_tensors().items():
        for part, tensor in parts.items():
            assert tensor.is_cuda and torch.equal(tensor.cpu(), cpu[name][part])


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_gradients_reach_only_mask_logits_and_training_lowers_loss(mask_type):
    model = build("llama", mask_type)
    model.train()
    inputs = make_inputs("llama")
    labels = inputs["input_ids"].clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        if step == 0:
            with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
            assert with_grad and all(".xpeft_mask_" in name for name in with_grad), with_grad
            # straight-through (hard) or softmax (soft) gradients are non-zero for both A and B masks
            for _, layer in xpeft_layers(model, "default"):
                assert layer.xpeft_mask_A["default"].grad.abs().sum() > 0
                assert layer.xpeft_mask_B["default"].grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    bank = model.base_model.xpeft_bank
    assert not list(bank.parameters()) and all(not t.requires_grad for t in bank.buffers())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_hard_forward_value_is_exactly_the_binary_mask_with_or_without_grad():
    model = build("bert", "hard").eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        no_grad = model(**inputs).logits
    with_grad = model(**inputs).logits
    torch.testing.assert_close(with_grad.detach(), no_grad, rtol=0, atol=0)


_BANK_SCRIPT = """
import sys, torch, xpeft
from peft import get_peft_model
from models import make_model
from xpeft.serialization import tensor_fingerprint
model = get_peft_model(make_model("gpt2"), xpeft.XPeftConfig(bank_size=5, reduction_factor=4, bank_seed=11))
layers = model.base_model.xpeft_bank.layer_tensors()
print(tensor_fingerprint({f"{n}.{p}": t for n, parts in layers.items() for p, t in parts.items()}))
"""


def test_seeded_bank_identical_across_fresh_processes():
    from xpeft.serialization import tensor_fingerprint

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    # Two fresh interpreters, run side by side.
    procs = [
        subprocess.Popen([sys.executable, "-c", _BANK_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs[0][1].decode()[-2000:]
    fingerprints = {out.decode().strip().splitlines()[-1] for out, _ in outputs}
    model = get_peft_model(make_model("gpt2"), XPeftConfig(bank_size=5, reduction_factor=4, bank_seed=11))
    layers = model.base_model.xpeft_bank.layer_tensors()
    local = tensor_fingerprint({f"{n}.{p}": t for n, parts in layers.items() for p, t in parts.items()})
    assert fingerprints == {local}
    other = get_peft_model(make_model("gpt2"), XPeftConfig(bank_size=5, reduction_factor=4, bank_seed=12))
    layers = other.base_model.xpeft_bank.layer_tensors()
    assert tensor_fingerprint({f"{n}.{p}": t for n, parts in layers.items() for p, t in parts.items()}) != local


def test_bank_is_shared_not_per_profile_and_never_in_state_dict():
    model = build("bert", "soft")
    before = sum(t.numel() for t in model.base_model.xpeft_bank.buffers())
    for i in range(5):
        model.add_adapter(f"p{i}", XPeftConfig(bank_size=N, reduction_factor=4, task_type="SEQ_CLS"))
    assert sum(t.numel() for t in model.base_model.xpeft_bank.buffers()) == before
    adapter_state = {k: v for k, v in model.state_dict().items() if "xpeft" in k}
    # only the mask logits: 2 x N per layer per profile
    assert sum(v.numel() for v in adapter_state.values()) == 6 * 2 * 2 * N
