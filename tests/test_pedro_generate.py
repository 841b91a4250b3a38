"""PEDRO at generation time (vectors computed once per prompt) and in training with transformers' Trainer."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from models import kv_cache_names, kv_cache_of, make_inputs, make_model
from xpeft import PedroConfig

NEW_TOKENS = 5


def pedro(model_name="llama", seed=0, adapters=("default",)):
    model = get_peft_model(make_model(model_name), PedroConfig(vg_rank=4, task_type="CAUSAL_LM"))
    for name in adapters[1:]:
        model.add_adapter(name, PedroConfig(vg_rank=4, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pedro_" in name:
                param.copy_(param + 0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


def left_padded_prompts(model_name="llama"):
    inputs = make_inputs(model_name, batch=3, seq_len=8)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # the last prompt is left-padded by 3 tokens
    return inputs


def count_generator_calls(model):
    counts = {"calls": 0}

    def hook(module, args, output):
        counts["calls"] += 1

    for name, module in model.named_modules():
        if name.split(".")[-2:-1] == ["pedro_generator"]:
            module.register_forward_hook(hook)
    return counts


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def greedy_by_recomputation(model, inputs):
    """Independent decode loop without KV cache: each step reruns the whole sequence, prompt marked explicitly."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = attention_mask.bool()
    eos = model.generation_config.eos_token_id
    finished = torch.zeros(len(input_ids), 1, dtype=torch.bool)
    tokens = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate does for left padding
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                prompt_mask=prompt,
                use_cache=False,
            )
            next_token = logits.logits[:, -1].argmax(-1, keepdim=True)
            next_token = torch.where(finished, 0, next_token)  # as generate: pad (id 0) after end of sequence
            finished |= next_token == eos
            tokens.append(next_token)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            prompt = torch.cat([prompt, torch.zeros_like(next_token, dtype=torch.bool)], dim=1)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "opt"])
def test_generator_runs_once_per_layer_per_generate_call(model_name):
    model = pedro(model_name)
    counts = count_generator_calls(model)
    inputs = left_padded_prompts(model_name)
    greedy(model, inputs)
    assert counts["calls"] == 2  # the tiny models have 2 blocks
    greedy(model, inputs)  # a new call recomputes
    assert counts["calls"] == 4
    greedy(model, inputs, num_beams=2)
    assert counts["calls"] == 6


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "opt"])
def test_cached_greedy_equals_recomputation_without_cache(model_name):
    model = pedro(model_name)
    inputs = left_padded_prompts(model_name)
    cached = greedy(model, inputs)
    torch.testing.assert_close(cached, greedy_by_recomputation(model, inputs), rtol=0, atol=0)
    # generate without KV cache also reuses the prefill's vectors, so it gives the same tokens
    torch.testing.assert_close(greedy(model, inputs, use_cache=False), cached, rtol=0, atol=0)
    with model.disable_adapter():
        assert not torch.equal(greedy(model, inputs), cached), "the adapter does not change generation"


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_tenant_generation_equals_each_tenant_alone(num_beams):
    model = pedro(adapters=("default", "other"))
    counts = count_generator_calls(model)
    inputs = left_padded_prompts()
    names = ["other", "__base__", "default"]
    mixed = greedy(model, inputs, adapter_names=names, num_beams=num_beams)
    assert counts["calls"] == 2 * 2  # one generator call per layer per distinct adapter, at the prefill only
    for index, name in enumerate(names):
        sample = {key: value[index : index + 1] for key, value in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = greedy(model, sample, num_beams=num_beams)
        else:
            model.set_adapter(name)
            alone = greedy(model, sample, num_beams=num_beams)
        torch.testing.assert_close(mixed[index : index + 1], alone, rtol=0, atol=0)


# The deprecated name must keep working until transformers removes it (5.40), so it is tested too, warning silenced.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_name", kv_cache_names())
def test_manual_kv_cache_continuation_reuses_prompt_vectors(cache_name):
    """Outside generate, a forward that continues a KV cache reuses the vectors of the forward that started it."""
    model = pedro()
    inputs = make_inputs("llama", batch=2, seq_len=6)
    inputs["attention_mask"][:] = 1
    next_token = torch.tensor([[5], [7]])
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        step = model(input_ids=next_token, **{cache_name: kv_cache_of(first)}, use_cache=True).logits[:, -1]
        full_ids = torch.cat([inputs["input_ids"], next_token], dim=1)
        prompt = torch.cat([torch.ones_like(inputs["input_ids"]), torch.zeros_like(next_token)], dim=1).bool()
        expected = model(input_ids=full_ids, prompt_mask=prompt).logits[:, -1]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)

    # Interleaved: prefill A, prefill B, continue B, then continue A: each cache continues its own prompt's vectors.
    other = make_inputs("llama", batch=2, seq_len=6, seed=2)
    other["attention_mask"][:] = 1
    with torch.no_grad():
        cache_a = kv_cache_of(model(**inputs, use_cache=True))
        cache_b = kv_cache_of(model(**other, use_cache=True))
        for cache, ids in ((cache_b, other["input_ids"]), (cache_a, inputs["input_ids"])):
            step = model(input_ids=next_token, **{cache_name: cache}, use_cache=True).logits[:, -1]
            expected = model(input_ids=torch.cat([ids, next_token], dim=1), prompt_mask=prompt).logits[:, -1]
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
        # A prompt run with the adapter disabled leaves no vectors for its cache: continuing it enabled errors.
        with model.disable_adapter():
            cache_c = kv_cache_of(model(**inputs, use_cache=True))
        with pytest.raises(ValueError, match="no vectors for it"):
            model(input_ids=next_token, **{cache_name: cache_c}, use_cache=True)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _collate_with_prompt_lengths(rows):
    batch = {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "attention_mask", "labels")}
    batch["prompt_lengths"] = torch.tensor([row["prompt_length"] for row in rows])
    return batch


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_trainer_steps_lower_the_loss(model_name, tmp_path):
    torch.manual_seed(0)
    task = "CAUSAL_LM" if model_name == "llama" else "SEQ_CLS"
    config = PedroConfig(vg_rank=4, task_type=task, modules_to_save=["classifier"] if model_name == "bert" else None)
    model = get_peft_model(make_model(model_name), config)
    inputs = make_inputs(model_name, batch=8, seq_len=10, seed=3)
    rows = []
    for i in range(8):
        row = {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i]}
        if model_name == "llama":  # prompt = first 4 tokens, labels -100 there (the default boundary)
            row["labels"] = torch.where(torch.arange(10) < 4, -100, inputs["input_ids"][i])
        else:  # sequence classification: the prompt is given explicitly, through the collator
            row["labels"] = torch.tensor(i % 2)
            row["prompt_length"] = 6
        rows.append(row)
    collator = _collate_with_prompt_lengths if model_name == "bert" else None
    if collator is None:
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    else:
        batch = collator(rows)
    model.eval()
    up_before = {n: p.detach().clone() for n, p in model.named_parameters() if "pedro_up" in n}
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=collator).train()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before
    # the PEDRO vectors themselves trained (not only a classification head)
    assert any(not torch.equal(p, up_before[n]) for n, p in model.named_parameters() if "pedro_up" in n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_generate(dtype):
    """fp16/bf16 model: finite logits in the model's dtype, close to the float32 run, and generate works."""
    model = pedro()
    inputs = left_padded_prompts()
    with torch.no_grad():
        reference = model(**inputs).logits
        half = model.to(dtype)
        logits = half(**inputs).logits
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(
        logits[valid].float(), reference[valid], rtol=0, atol=0.02
    )  # PEDRO moves logits by ~0.5
    tokens = greedy(half, inputs)
    assert tokens.shape == (3, NEW_TOKENS)
    assert ((tokens >= 0) & (tokens < half.config.vocab_size)).all()
