"""The decoder stack run outside the PEDRO model's forward (custom heads, custom decode loops) gets the model's own
per-call handling, and per-call state is never left in a thread's context by an interrupted forward."""

from __future__ import annotations

import contextvars

import pytest
import torch

from models import make_inputs, make_model
from test_pedro import perturbed
from test_pedro_generate import pedro
from xpeft.pedro.layer import CURRENT_FORWARD


def inner_stack_gradients(checkpointing: dict | None) -> dict[str, torch.Tensor]:
    model = perturbed(make_model("llama").double())
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    model.train()
    inputs = make_inputs("llama")
    hidden = model.get_base_model().model(**inputs, use_cache=False).last_hidden_state
    (hidden**2).mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_training_the_decoder_stack_with_transformers_checkpointing(use_reentrant):
    """A custom head on `model.model`'s hidden states (reward or embedding training) with transformers' own
    activation checkpointing: the same gradients as without it (the decoder stack opens the forward's state itself)."""
    expected = inner_stack_gradients(None)
    actual = inner_stack_gradients({"use_reentrant": use_reentrant})
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_decoder_stack_continuing_a_cache_does_not_pool_the_new_tokens():
    """The decoder stack continued with its own KV cache (a custom decode loop over `model.model` + `lm_head`) reuses
    the prompt's vectors, as the full model does (before, each block pooled the new token: max |Δ| 0.74)."""
    model = pedro()
    ids = make_inputs("llama", batch=2, seq_len=6)["input_ids"]
    next_token = torch.tensor([[5], [7]])
    inner = model.get_base_model().model
    full = torch.cat([ids, next_token], dim=1)
    prompt = torch.zeros_like(full, dtype=torch.bool)
    prompt[:, :6] = True
    with torch.no_grad():
        expected = model(input_ids=full, prompt_mask=prompt, output_hidden_states=True).hidden_states[-1][:, -1]
        cache = inner(input_ids=ids, use_cache=True).past_key_values
        try:
            got = inner(input_ids=next_token, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        except ValueError as error:
            assert "cache" in str(error)
            return
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_forward_leaves_no_state_in_the_thread():
    """A BaseException inside the forward (KeyboardInterrupt, a signal-based request timeout) skips torch's always-call
    hooks (they run on `Exception` only); the peft call restores the thread's context, so a later direct call of the
    decoder stack pools its own input, not the dead forward's prompt mask (before: max |Δhidden| 0.106)."""
    # Run in a copy of the context, so that a leak does not reach the other tests of this process.
    contextvars.copy_context().run(interrupted_forward_then_decoder_stack)


def interrupted_forward_then_decoder_stack():
    model = pedro()
    inputs = make_inputs("llama")
    inner = model.get_base_model().model
    with torch.no_grad():
        expected = inner(input_ids=inputs["input_ids"]).last_hidden_state

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = inner.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs)
    handle.remove()
    leaked = CURRENT_FORWARD.get()
    with torch.no_grad():
        got = inner(input_ids=inputs["input_ids"]).last_hidden_state
    assert leaked is None, "the interrupted forward's state is still current in this thread"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
