"""`benchmarks.evaluate.answer_loss` scores PEDRO with the prompt boundary of training (the labels), not with the
whole text pooled: reference computed here with an explicit `prompt_mask`."""

import math

import torch
from benchmarks.evaluate import answer_loss
from peft import get_peft_model

from models import VOCAB_SIZE, make_model
from xpeft import PedroConfig


def test_pedro_answer_loss_pools_the_prompt_only():
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), PedroConfig(task_type="CAUSAL_LM", vg_rank=4)).eval()
    with torch.no_grad():  # a trained-looking generator: its vectors depend on what it pools
        for name, param in model.named_parameters():
            if "pedro_" in name:
                param.add_(0.5 * torch.randn_like(param))
    ids = torch.randint(3, VOCAB_SIZE, (3, 10))
    labels = ids.clone()
    labels[:, :6] = -100  # prompt: the first 6 tokens
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def loss_with(**prompt) -> float:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=tensors["attention_mask"], **prompt).logits[:, :-1]
        target = labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100).item()

    prompt_only = loss_with(prompt_mask=labels == -100)
    whole_text = loss_with()  # no boundary: every position is prompt
    assert abs(prompt_only - whole_text) > 1e-4  # the boundary matters for this model
    result = answer_loss(model, tensors, batch=2)
    assert math.isclose(result["answer_loss"], prompt_only, rel_tol=1e-5)
    assert result["answer_tokens"] == 3 * 4
