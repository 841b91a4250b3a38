"""Bi-level training of PEDRO's rational activation with transformers' Trainer (`xpeft.pedro.BilevelTrainer`),
checked against one alternating step recomputed by hand in float64 with plain SGD."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from models import VOCAB_SIZE, make_inputs, make_model
from xpeft import PedroConfig
from xpeft.pedro import BilevelTrainer, rational_coefficients

LR, ACTIVATION_LR, PROMPT = 0.1, 0.5, 4


def samples(n: int, seed: int) -> list[dict]:
    """`n` unpadded samples of 10 tokens: a 4-token prompt (labels -100), then 6 supervised tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (n, 10), generator=generator)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels, strict=True)
    ]


def batch_of(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def pedro_model(dtype=torch.float64):
    config = PedroConfig(task_type="CAUSAL_LM", vg_rank=4, init_weights=False)  # up ≠ 0: the activation matters
    torch.manual_seed(0)
    return get_peft_model(make_model("llama").to(dtype), config)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**kwargs, **overrides})


def bilevel(model, tmp_path, train, held_out, **overrides) -> BilevelTrainer:
    every = overrides.pop("activation_every", 1)
    return BilevelTrainer(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=train, activation_dataset=held_out,
        activation_lr=ACTIVATION_LR, activation_every=every, activation_optimizer_cls=torch.optim.SGD,
    )  # fmt: skip


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def one_alternating_step_by_hand(model, train: list[dict], held_out: list[dict]) -> dict[str, torch.Tensor]:
    """Plain SGD in float64: the training batch moves every parameter but the coefficients, then the held-out batch
    moves the coefficients only (through the model the first update produced)."""
    model = copy.deepcopy(model).train()
    coefficients = {id(p) for p in rational_coefficients(model)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    others = [p for _, p in named if id(p) not in coefficients]
    grads = torch.autograd.grad(model(**batch_of(train)).loss, others)
    with torch.no_grad():
        for p, g in zip(others, grads, strict=True):
            p -= LR * g
    ours = [p for _, p in named if id(p) in coefficients]
    grads = torch.autograd.grad(model(**batch_of(held_out)).loss, ours)
    with torch.no_grad():
        for p, g in zip(ours, grads, strict=True):
            p -= ACTIVATION_LR * g
    return trainable_state(model)


def test_one_step_matches_the_float64_recomputation(tmp_path):
    model = pedro_model()
    train, held_out = samples(2, seed=1), samples(2, seed=2)
    before = trainable_state(model)
    expected = one_alternating_step_by_hand(model, train, held_out)
    bilevel(model, tmp_path, train, held_out).train()
    after = trainable_state(model)
    assert after.keys() == expected.keys() and any("act.numerator" in name for name in after)
    for name in after:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
        torch.testing.assert_close(after[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    # The roles matter: a coefficient step on the training batch instead would land elsewhere.
    coefficient = next(name for name in after if name.endswith("act.numerator"))
    swapped = one_alternating_step_by_hand(model, held_out, train)
    assert not torch.allclose(swapped[coefficient], after[coefficient], rtol=1e-6, atol=1e-9)


def test_gradient_accumulation_gives_the_same_step(tmp_path):
    train, held_out = samples(2, seed=1), samples(2, seed=2)
    whole, accumulated = pedro_model(), pedro_model()
    bilevel(whole, tmp_path / "a", train, held_out).train()
    bilevel(
        accumulated, tmp_path / "b", train, held_out, per_device_train_batch_size=1, gradient_accumulation_steps=2
    ).train()
    expected = trainable_state(whole)
    for name, value in trainable_state(accumulated).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_joint_training_with_the_plain_trainer_trains_the_coefficients_on_training_batches(tmp_path):
    model = pedro_model()
    train = samples(2, seed=1)
    before = trainable_state(model)
    Trainer(model=model, args=arguments(tmp_path), train_dataset=train).train()
    after = trainable_state(model)
    assert all(not torch.equal(after[name], before[name]) for name in after)


def test_held_out_update_every_k_steps_and_coefficients_stay_trainable(tmp_path):
    model = pedro_model(torch.float32)
    trainer = bilevel(model, tmp_path, samples(4, seed=1), samples(2, seed=2), max_steps=3, activation_every=2,
                      per_device_train_batch_size=1)  # fmt: skip
    calls = []
    update = trainer.activation_update
    trainer.activation_update = lambda: calls.append(trainer.state.global_step) or update()
    trainer.train()
    assert calls == [2]
    assert all(p.requires_grad for p in rational_coefficients(model))  # as before `train()`


def test_checkpoints_and_save_pretrained_hold_the_trained_coefficients(tmp_path):
    model = pedro_model(torch.float32)
    trainer = bilevel(model, tmp_path / "run", samples(4, seed=1), samples(2, seed=2), max_steps=2,
                      save_strategy="steps", save_steps=1)  # fmt: skip
    trainer.train()
    model.eval()
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    for folder in (tmp_path / "adapter", tmp_path / "run" / "checkpoint-2"):
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(make_model("llama"), folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_refuses_a_model_without_rational_activation_and_bad_arguments(tmp_path):
    gelu = get_peft_model(make_model("llama"), PedroConfig(task_type="CAUSAL_LM", vg_rank=4, activation="gelu"))
    with pytest.raises(ValueError, match="no trainable rational activation.*activation='rational'"):
        BilevelTrainer(model=gelu, args=arguments(tmp_path), train_dataset=samples(2, 1), activation_dataset=[])
    with pytest.raises(ValueError, match="`activation_every` must be a positive integer"):
        BilevelTrainer(model=pedro_model(), args=arguments(tmp_path), activation_dataset=[], activation_every=0)
    model = pedro_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="passed to BilevelTrainer updates the rational activation's coefficients"):
        BilevelTrainer(model=model, args=arguments(tmp_path), activation_dataset=[], optimizers=(optimizer, None))
