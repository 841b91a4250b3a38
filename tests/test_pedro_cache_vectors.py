"""PEDRO's vectors travel with the KV cache object, through the cache's own row operations (reorder, select) and
copies, without keeping the model alive. Reference: the full sequence without cache, with the cached part marked as
the prompt."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from models import kv_cache_of, make_inputs
from test_pedro_generate import pedro

NEXT = torch.tensor([[5], [7]])


def prompt_and_reference(model):
    """Two 6-token prompts and the logits of one more token each, recomputed without cache (prompt = the 6 tokens)."""
    ids = make_inputs("llama", batch=2, seq_len=6)["input_ids"]
    full = torch.cat([ids, NEXT], dim=1)
    prompt = torch.zeros_like(full, dtype=torch.bool)
    prompt[:, :6] = True
    with torch.no_grad():
        reference = model(input_ids=full, prompt_mask=prompt, use_cache=False).logits[:, -1]
    return ids, reference


def step(model, cache, next_token):
    with torch.no_grad():
        return model(input_ids=next_token, past_key_values=cache, use_cache=True).logits[:, -1]


def test_reordered_cache_continues_each_rows_own_vectors():
    """`Cache.reorder_cache` (as beam search uses it) moves the keys and values of each row; PEDRO's vectors follow
    the rows (before, the rows continued with the other sample's vectors, silently: max |Δlogit| 0.056)."""
    model = pedro()
    ids, reference = prompt_and_reference(model)
    with torch.no_grad():
        cache = kv_cache_of(model(input_ids=ids, use_cache=True))
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(step(model, cache, NEXT.flip(0)), reference.flip(0), rtol=1e-5, atol=1e-5)


def test_selected_cache_rows_continue():
    """`Cache.batch_select_indices` keeps some conversations of a batch; they continue with their own vectors."""
    model = pedro()
    ids, reference = prompt_and_reference(model)
    with torch.no_grad():
        cache = kv_cache_of(model(input_ids=ids, use_cache=True))
    cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(step(model, cache, NEXT[1:]), reference[1:], rtol=1e-5, atol=1e-5)


def test_deep_copied_prefix_cache_continues_without_copying_the_model():
    """transformers' documented prompt-reuse pattern deep-copies a prefix cache per request: the copy shares the
    vectors (never the model's layers) and continues with them."""
    model = pedro()
    ids, reference = prompt_and_reference(model)
    with torch.no_grad():
        cache = kv_cache_of(model(input_ids=ids, use_cache=True))
    copied = copy.deepcopy(cache)
    weights = {id(p) for p in model.parameters()}
    copied_modules = [value for value in vars(copied).values() if isinstance(value, dict)]
    for mapping in copied_modules:
        for key in mapping:
            assert not isinstance(key, torch.nn.Module) or all(id(p) in weights for p in key.parameters()), (
                "deepcopy of the cache copied a model layer"
            )
    torch.testing.assert_close(step(model, copied, NEXT), reference, rtol=1e-5, atol=1e-5)


def test_a_kept_cache_does_not_keep_the_deleted_models_weights():
    """A cache kept by a server (conversation or prefix store) does not keep a dropped model's weights alive: the
    vectors hold their layers weakly."""
    model = pedro()
    ids = make_inputs("llama", batch=2, seq_len=6)["input_ids"]
    with torch.no_grad():
        cache = kv_cache_of(model(input_ids=ids, use_cache=True))
    weight = weakref.ref(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    del model
    gc.collect()
    assert cache is not None and weight() is None, "the cache keeps the model's q_proj weight alive"


def test_edited_cache_rows_raise():
    """Rows that match no prompt PEDRO computed vectors for (the cache's values were changed) raise, never guess."""
    model = pedro()
    ids, _ = prompt_and_reference(model)
    with torch.no_grad():
        cache = kv_cache_of(model(input_ids=ids, use_cache=True))
    cache.layers[0].values[1] += 1.0
    with pytest.raises(ValueError, match="rows no longer match the prompts PEDRO computed their vectors from"):
        step(model, cache, NEXT)
