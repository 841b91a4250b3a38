"""ETHER's special paths (xpeft.ether.fused) against the plain torch ops that replace them when switched off."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from models import make_inputs, make_model
from xpeft import EtherConfig
from xpeft.ether import fused


@pytest.mark.parametrize("variant", ["ether", "ether_plus", "ether_plus_one_sided"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_plain_paths_compute_the_same_loss_and_gradients(model_name, variant):
    torch.manual_seed(0)
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant=variant, init_weights=False)
    model = get_peft_model(make_model(model_name), config).double().eval()
    inputs = make_inputs(model_name, batch=2, seq_len=6)
    vectors = [p for n, p in model.named_parameters() if "ether_" in n]

    def loss_and_grads():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        return loss, torch.autograd.grad(loss, vectors)

    loss, grads = loss_and_grads()
    for paths in [("block_update",), ("two_sided_linear",), ()]:
        with fused.plain_paths(*paths):
            assert not any(fused.ENABLED[path] for path in paths or fused.PATHS)
            plain_loss, plain_grads = loss_and_grads()
        torch.testing.assert_close(plain_loss, loss, rtol=1e-12, atol=1e-12)
        for plain, grad in zip(plain_grads, grads, strict=True):
            torch.testing.assert_close(plain, grad, rtol=1e-10, atol=1e-12)
    assert all(fused.ENABLED.values())  # restored on exit


def test_switch_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown ETHER paths \['fast'\]; choose among block_update, two_sided"):
        with fused.plain_paths("fast"):
            pass
    monkeypatch.setenv("XPEFT_ETHER_PLAIN", "two_sided_linear, block_update")
    assert fused._enabled_from_env() == {"block_update": False, "two_sided_linear": False}
    monkeypatch.setenv("XPEFT_ETHER_PLAIN", "all")
    assert not any(fused._enabled_from_env().values())
    monkeypatch.setenv("XPEFT_ETHER_PLAIN", "")
    assert all(fused._enabled_from_env().values())
    monkeypatch.setenv("XPEFT_ETHER_PLAIN", "blockupdate")
    with pytest.raises(
        ValueError, match=r"XPEFT_ETHER_PLAIN names unknown ETHER paths \['blockupdate'\]; use a comma"
    ):
        fused._enabled_from_env()
