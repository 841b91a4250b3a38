"""PEDRO keeps each call's state with the call: activation checkpointing recomputes every block with the prompt of its
own forward, whatever ran in between, and a KV cache carries its prompt's vectors."""

from __future__ import annotations

import pytest
import torch

from models import make_inputs, make_model
from test_pedro import perturbed, prompt_batch


def other_prompt_batch():
    """Another batch of the same shape as `prompt_batch`, with other tokens and other prompt lengths."""
    inputs, _ = prompt_batch("right")
    inputs = {key: value.clone() for key, value in inputs.items()}
    inputs["input_ids"] = make_inputs("llama", batch=3, seq_len=10, seed=7)["input_ids"]
    prompt = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    for row, length in enumerate((2, 7, 3)):
        prompt[row, :length] = True
    inputs["labels"] = torch.where(prompt | (inputs["attention_mask"] == 0), -100, inputs["input_ids"])
    return inputs


def disturb_between(model, pattern: str) -> torch.Tensor | None:
    """What runs between the training forward(s) and the backward; returns a second loss for "two_forwards"."""
    if pattern == "two_forwards":
        return model(**other_prompt_batch()).loss
    if pattern == "no_grad_other_length":
        shorter = make_inputs("llama", batch=2, seq_len=5, seed=3)
        with torch.no_grad():
            model(input_ids=shorter["input_ids"], attention_mask=shorter["attention_mask"])
    elif pattern == "disabled_forward":
        with model.disable_adapter():
            model(**other_prompt_batch())
    return None


def gradients(pattern: str, checkpointing: dict | None) -> dict[str, torch.Tensor]:
    model = perturbed(make_model("llama").double())
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    model.train()
    inputs, _ = prompt_batch("left")
    loss = model(**inputs).loss
    second = disturb_between(model, pattern)
    (loss if second is None else loss + second).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("pattern", ["two_forwards", "no_grad_other_length", "disabled_forward"])
def test_checkpointed_recompute_uses_its_own_forwards_prompt(pattern, use_reentrant):
    """The three patterns that gave wrong gradients with no warning (max |Δgrad| 1.65e-2 of 1.9e-2) when the recompute
    read the latest forward's prompt mask: each now equals the run without checkpointing."""
    expected = gradients(pattern, None)
    actual = gradients(pattern, {"use_reentrant": use_reentrant})
    assert expected.keys() == actual.keys() and any("pedro_" in name for name in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-10, atol=1e-12, msg=name)


class _CheckpointedModule(torch.nn.Module):
    """Checkpoints a whole module call (hooks included), as FSDP's and accelerate's activation checkpoint wrappers do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("wrapping", ["forward", "module"])
def test_custom_checkpointing_without_the_forward_state_errors_instead_of_pooling_the_wrong_tokens(wrapping):
    """A recompute that PEDRO cannot tie to its forward (torch's checkpoint called by hand around a block's forward, or
    around the whole block module) raises; it never pools the whole input silently."""
    from torch.utils.checkpoint import checkpoint

    model = perturbed(make_model("llama").double()).train()
    layers = model.base_model.model.model.layers
    if wrapping == "forward":
        block_forward = layers[0].forward
        layers[0].forward = lambda *args, **kwargs: checkpoint(block_forward, *args, use_reentrant=False, **kwargs)
    else:
        layers[0] = _CheckpointedModule(layers[0])
    inputs, _ = prompt_batch("left")
    loss = model(**inputs).loss
    with pytest.raises(RuntimeError, match="recomputed during backward without the state of its forward"):
        loss.backward()


def test_nothing_per_call_is_stored_on_the_model():
    """After forwards, generate and a backward, no PEDRO module holds tensors of a call (prompt masks, codes, vectors)."""
    model = perturbed(make_model("llama"))
    inputs = make_inputs("llama")
    with torch.no_grad():
        model(**inputs, use_cache=True)
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.train()
    model(**inputs, labels=inputs["input_ids"], prompt_lengths=[2, 2, 2]).loss.backward()
    parameters = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules") and _holds_call_tensor(value, parameters):
                raise AssertionError(f"{type(module).__name__}.{name} holds a tensor of a call between calls")


def _holds_call_tensor(value, parameters: set[int], depth: int = 0) -> bool:
    """Whether `value` reaches a tensor that is not a parameter or buffer (through containers and plain objects)."""
    if isinstance(value, torch.Tensor):
        return id(value) not in parameters
    if depth > 4 or isinstance(value, (torch.nn.Module, str, bytes, int, float, type)) or callable(value):
        return False
    if isinstance(value, dict):
        items = list(value.keys()) + list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return False
    return any(_holds_call_tensor(item, parameters, depth + 1) for item in items)


def _as_replica(module):
    """What `torch.nn.DataParallel` makes of a module on each forward (torch sets `_is_replica` on every copy)."""
    module._is_replica = True
    return module


def test_data_parallel_replicas_are_refused_with_a_clear_error():
    """DataParallel replicas share the original's hooks, so per-call state cannot be kept per replica: refused."""
    model = perturbed(make_model("llama"))
    _as_replica(model.base_model.model)
    with pytest.raises(RuntimeError, match="cannot run inside `torch.nn.DataParallel`.*DistributedDataParallel"):
        model(**make_inputs("llama"))


def test_routing_in_data_parallel_replicas_is_refused():
    from peft import get_peft_model

    from xpeft import EtherConfig

    model = get_peft_model(make_model("llama"), EtherConfig(target_modules=["q_proj"], n_blocks=4)).eval()
    _as_replica(model.base_model)
    with pytest.raises(RuntimeError, match="Per-sample `adapter_names` cannot run inside `torch.nn.DataParallel`"):
        model(**make_inputs("llama"), adapter_names=["default"] * 3)


@pytest.mark.cuda
def test_data_parallel_on_two_gpus_is_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    model = perturbed(make_model("llama")).cuda()
    inputs = {key: value.cuda() for key, value in make_inputs("llama", batch=4).items()}
    with pytest.raises(RuntimeError, match="DataParallel"):
        torch.nn.DataParallel(model)(**inputs)


def test_inner_model_called_directly_pools_its_whole_input():
    """The decoder stack called on its own (outside the PEDRO model's forward) runs each block with a state of its
    own, where the whole input is the prompt: the same as the model forward without a prompt boundary."""
    model = perturbed(make_model("llama"))
    input_ids = make_inputs("llama")["input_ids"]
    with torch.no_grad():
        direct = model.get_base_model().model(input_ids=input_ids).last_hidden_state
        through_model = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(direct, through_model, rtol=0, atol=0)
