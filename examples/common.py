"""Shared pieces of the example training scripts: data, models, the Trainer run and its record.

Two scales, same code path:

* ``--tiny``: a randomly initialised tiny BERT / Llama built from a config class and synthetic data. No asset needed;
  used by the tests (a 2-process ``accelerate launch`` run included).
* default: the real assets of the evaluation suite, loaded offline by ``xpeft.datasets`` (all-MiniLM-L6-v2 on
  SpamAssassin for classification, SmolLM2-135M-Instruct on chatterbot-corpus pairs for instruction tuning).

Every script writes ``<output_dir>/train_record.json`` (loss history, eval metrics, adapter checksum per rank) and
saves the adapter with ``Trainer.save_model`` (``PeftModel.save_pretrained`` underneath).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from xpeft import datasets  # noqa: E402

TINY_VOCAB = 128


def base_parser(description: str, default_lr: float, default_steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model + synthetic data (no asset needed)")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where the adapter and train_record.json go (default: a new outputs/<method>[-tiny]/<time> per run)",
    )
    parser.add_argument("--max-steps", type=int, default=default_steps, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=default_lr, help="learning rate (AdamW, constant schedule)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step and per process")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (real data)")
    parser.add_argument("--n-train", type=int, default=None, help="cap on training examples (real data; default all)")
    parser.add_argument("--n-eval", type=int, default=200, help="cap on evaluation examples (real data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model head, the data order and the split")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if an accelerator is present")
    parser.add_argument(
        "--baseline",
        choices=["lora", "ia3"],
        default=None,
        help="train a peft baseline instead of this script's xpeft method (same data, model and Trainer)",
    )
    return parser


def baseline_config(name: str, task: str):
    """peft LoRA r=8 / IA3 on the same modules the evaluation suite uses."""
    if task == "SEQ_CLS":
        if name == "lora":
            return LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=["query", "value"])
        return IA3Config(
            task_type=task, target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        )
    if name == "lora":
        return LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return IA3Config(
        task_type=task, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )


# ------------------------------------------------------------------------------------------------------------- data
class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tiny_classification(n: int, seq_len: int = 16, seed: int = 0) -> ListDataset:
    """Label = whether token 3 occurs in the sequence: learnable by attention in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY_VOCAB, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(1, seq_len, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = 3
    ids[:, 0] = 1  # [CLS]-like start token
    mask = torch.ones_like(ids)
    return ListDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)])


def tiny_instructions(n: int, prompt_len: int = 8, answer_len: int = 6, seed: int = 0) -> ListDataset:
    """Prompt = random tokens, answer = the first prompt tokens shifted by one id; loss on the answer only."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, TINY_VOCAB - 1, (n, prompt_len), generator=g)
    answer = prompt[:, :answer_len] + 1
    ids = torch.cat([prompt, torch.full((n, 1), 2), answer], dim=1)  # 2 = separator
    labels = ids.clone()
    labels[:, : prompt_len + 1] = -100
    mask = torch.ones_like(ids)
    return ListDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)])


def encode_classification(tokenizer, pairs, max_length: int) -> ListDataset:
    enc = tokenizer(
        [t for t, _ in pairs], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    labels = torch.tensor([lbl for _, lbl in pairs])
    return ListDataset(
        [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(pairs))
        ]
    )


def encode_chat(tokenizer, pairs, max_length: int) -> ListDataset:
    """Chat-template each (prompt, answer); labels are -100 on the prompt (loss on the answer only), right padded."""
    rows = []
    for prompt, answer in pairs:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[:max_length]
        labels = ([-100] * len(p_ids) + a_ids)[:max_length]
        pad = max_length - len(ids)
        rows.append(
            {
                "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                "labels": torch.tensor(labels + [-100] * pad),
            }
        )
    return ListDataset(rows)


# ----------------------------------------------------------------------------------------------------------- models
def classification_setup(args):
    """(model, train_ds, eval_ds) for sequence classification."""
    if args.tiny:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(args.seed)
        cfg = BertConfig(
            vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2,
        )  # fmt: skip
        return BertForSequenceClassification(cfg), tiny_classification(512, seed=1), tiny_classification(128, seed=2)
    model, tok = datasets.load_minilm(num_labels=2)
    splits = datasets.spam_assassin()
    train = splits["train"][: args.n_train] if args.n_train else splits["train"]
    test = _shuffled(splits["test"], args.seed)[: args.n_eval]  # the split is ordered by mail path (ham first)
    return model, encode_classification(tok, train, args.max_length), encode_classification(tok, test, args.max_length)


def causal_setup(args):
    """(model, train_ds, eval_ds, tokenizer or None) for answer-only instruction tuning."""
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        cfg = LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        )  # fmt: skip
        return LlamaForCausalLM(cfg), tiny_instructions(512, seed=1), tiny_instructions(128, seed=2), None
    model, tok = datasets.load_smollm2()
    topics = datasets.chatterbot()
    train = [pa for t in sorted(topics) for pa in topics[t]["train"]]
    test = [pa for t in sorted(topics) for pa in topics[t]["test"]]
    train = _shuffled(train, args.seed)
    train = train[: args.n_train] if args.n_train else train
    test = _shuffled(test, args.seed)[: args.n_eval]  # topics come in alphabetical order
    return model, encode_chat(tok, train, args.max_length), encode_chat(tok, test, args.max_length), tok


def _shuffled(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


# ---------------------------------------------------------------------------------------------------------- training
def adapter_checksum(model) -> str:
    """sha256 of every trainable tensor (sorted by name): equal across DDP ranks iff they hold the same adapter."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def accuracy_metrics(eval_pred):
    logits, labels = eval_pred
    pred = logits.argmax(-1)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    return {"accuracy": float((pred == labels).mean()), "f1": f1}


def train(args, model, peft_config, train_ds, eval_ds, name: str, classification: bool):
    """Wrap ``model`` with ``peft_config``, train it with transformers ``Trainer``, save it, record the run.

    The evaluation metrics are taken before and after training, so the record shows what training changed. Returns
    ``(record, peft_model)``.
    """
    model = get_peft_model(model, peft_config)
    # A multi-process launch (accelerate --multi_gpu / torchrun) on a machine without CUDA must run DDP over gloo on
    # CPU; without use_cpu=True, transformers would leave every process training alone on its own data copy.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    targs = TrainingArguments(
        output_dir=args.output_dir or "outputs",  # replaced by this run's folder below, once ranks can agree
        use_cpu=args.cpu or (distributed and not torch.cuda.is_available()),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=bool(os.environ.get("XPEFT_QUIET")),
        # With the default (True), transformers multiplies each rank's loss by the number of processes (so that DDP's
        # gradient average gives the global token mean) and logs that product: the logged loss doubles on 2 ranks.
        # Each rank's own token mean, averaged by DDP, logs the true loss and equals the global mean when ranks hold
        # equally many target tokens (these scripts pad to a fixed length).
        average_tokens_across_devices=False,
    )
    output_dir = run_folder(args.output_dir, f"{name}{'-tiny' if args.tiny else ''}")
    targs.output_dir = str(output_dir)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        compute_metrics=accuracy_metrics if classification else None,
    )
    rank = trainer.args.process_index
    if rank == 0:
        model.print_trainable_parameters()
    # Trainer.evaluate() before train() leaves the DDP ranks training apart (their adapters differ afterwards), so
    # the before/after comparison uses a plain loop on each rank's full copy of the held-out set.
    before = held_out_metrics(model, eval_ds, classification)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    after = held_out_metrics(model, eval_ds, classification)
    trainer.save_model(str(output_dir))  # PeftModel.save_pretrained on the main process
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "method": name,
        "tiny": args.tiny,
        "world_size": trainer.args.world_size,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "losses": losses,
        "held_out_before": before,
        "held_out_after": after,
        "eval": metrics,
        "train_seconds": train_seconds,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_sha256": adapter_checksum(model),
        "output_dir": str(output_dir),
    }
    if not classification and "eval_loss" in metrics:
        record["eval_perplexity"] = float(torch.exp(torch.tensor(metrics["eval_loss"])))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"train_record.rank{rank}.json").write_text(json.dumps(record, indent=1))
    if rank == 0:
        (output_dir / "train_record.json").write_text(json.dumps(record, indent=1))
        print(summary(record, classification, baseline=args.baseline is not None))
    if torch.distributed.is_initialized():
        _release_process_group(trainer)
    return record, model


@torch.no_grad()
def held_out_metrics(model, eval_ds, classification: bool, batch_size: int = 32) -> dict:
    """Loss (mean over examples, or over answer tokens for a causal LM) and, for classification, accuracy."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    loss_sum, weight, correct = 0.0, 0, 0
    for start in range(0, len(eval_ds), batch_size):
        rows = [eval_ds[i] for i in range(start, min(start + batch_size, len(eval_ds)))]
        batch = {k: torch.stack([row[k] for row in rows]).to(device) for k in rows[0]}
        out = model(**batch)
        if classification:
            n = len(rows)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())  # the shifted targets the loss averages over
        loss_sum += float(out.loss) * n
        weight += n
    model.train(was_training)
    metrics = {"loss": loss_sum / weight}
    if classification:
        metrics["accuracy"] = correct / len(eval_ds)
    return metrics


def run_folder(requested: str | None, name: str) -> Path:
    """The folder this run saves into: ``requested``, or a new ``outputs/<name>/<UTC time>`` that no run used before.

    Under DDP, rank 0 picks the folder and the other ranks take its choice, so all ranks write into one folder.
    """
    if requested is not None:
        return Path(requested)
    folder = None
    if int(os.environ.get("RANK", "0")) == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        folder = Path("outputs") / name / stamp
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = Path("outputs") / name / f"{stamp}-{suffix}"
        folder.mkdir(parents=True)
    if torch.distributed.is_initialized():
        chosen = [folder]
        torch.distributed.broadcast_object_list(chosen, src=0)
        folder = chosen[0]
    return Path(folder)


TINY_NOTE = (
    "--tiny trains on a randomly initialised model, which holds no features for {method} to re-use (reflections,\n"
    "masks over a bank, scaling vectors), so its metric stays near chance; `--tiny --baseline lora` shows the task\n"
    "itself is learnable. --tiny checks the plumbing (train, save, reload, DDP); drop it to see {method} learn on\n"
    "the bundled MiniLM / SmolLM2."
)


def summary(record: dict, classification: bool, baseline: bool) -> str:
    """What the run changed, where it saved, and (for --tiny xpeft runs) why the metric may not move."""
    key = "accuracy" if classification else "loss"
    before, after = record["held_out_before"][key], record["held_out_after"][key]
    lines = [
        f"{record['method']}: {record['max_steps']} steps, {record['trainable_params']:,} trainable parameters, "
        f"{record['train_seconds']:.1f} s",
        f"  held-out {key}: {before:.3f} before training -> {after:.3f} after",
        f"  training loss (logged every {max(1, record['max_steps'] // 10)} steps): "
        + " ".join(f"{loss:.3f}" for loss in record["losses"]),
        f"  adapter saved to {record['output_dir']} (reload: PeftModel.from_pretrained(base_model, that folder))",
    ]
    if record["tiny"] and not baseline:
        lines.append(TINY_NOTE.format(method=record["method"]))
    return "\n".join(lines)


def _release_process_group(trainer) -> None:
    """Tear DDP down while every rank is alive and idle (torch 2.13, gloo: a rank can otherwise abort or hang at exit).

    A gloo worker thread that drops the last reference to a finished collective needs the GIL to free its tensors; if
    the process group is destroyed at that moment (interpreter exit, or the DDP model freed), the destructor joins that
    thread while holding the GIL, and the rank hangs or aborts ("terminate called without an active exception",
    pytorch/pytorch#190489). A barrier waits with the GIL released, so the workers finish their releases first.
    The group is gone afterwards: these scripts train once per process (a second DDP `train()` would need a new one).
    """
    torch.distributed.barrier()
    trainer.model_wrapped = trainer.model  # drop the DDP wrapper (and its reducer) while the group is still usable
    trainer.accelerator.free_memory()
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
