"""Train an xpeft adapter with FSDP2 (`torch.distributed.fsdp.fully_shard`), save it from rank 0, reload it anywhere.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py --method ether --out outputs/fsdp2
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --method ether ether_plus x_peft_soft x_peft_hard pedro

Each method trains a tiny seeded Llama (or `--model`, a local causal LM folder) for `--steps` AdamW steps on a fixed
synthetic batch that the ranks split between them, and is saved to `OUT/<method>`. On CPU the process group uses gloo,
with CUDA nccl (one GPU per rank). tests/test_fsdp2.py runs this script and checks that the reloaded adapters equal a
one-process run of the same steps.

The recipe, for every xpeft method (ETHER, ETHER+, X-PEFT soft and hard masks, PEDRO):

1. `get_peft_model(base, config)` first, then `fully_shard` every decoder layer, then the whole model.
2. Build the optimizer after sharding (it must hold the sharded parameters).
3. Save in two steps. Every rank gathers the full state dict, because gathering is a collective:
       state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
   then rank 0 alone writes it: `model.save_pretrained(out, state_dict=state)`.
   A direct `model.save_pretrained(out)` on a sharded model is refused with an error that names this recipe: xpeft
   cannot gather for you, since a gather started on rank 0 alone would wait forever for the other ranks. A state dict
   that still holds sharded (DTensor), flattened (FSDP1) or empty adapter tensors is refused too, never written.
4. Load without FSDP, in any process: `PeftModel.from_pretrained(base, out)` (after `import xpeft`).

With accelerate (GPUs only: `accelerate launch --use_fsdp --cpu` is refused, and a config with `use_cpu: true`
silently runs DDP instead, so this path is not tested here), the FSDP2 config is

    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    num_processes: 2
    mixed_precision: "no"          # or bf16
    fsdp_config:
      fsdp_version: 2
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
      fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer   # your model's decoder layer class
      fsdp_reshard_after_forward: true
      fsdp_state_dict_type: FULL_STATE_DICT
      fsdp_offload_params: false
      fsdp_cpu_ram_efficient_loading: false

and the save is `state = accelerator.get_state_dict(model)` on every rank, then
`accelerator.unwrap_model(model).save_pretrained(out, state_dict=state)` on the main process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

METHODS = ("ether", "ether_plus", "x_peft_soft", "x_peft_hard", "pedro")
BATCH, SEQ_LEN, PROMPT_LEN = 4, 12, 5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny seeded Llama of tests/models.py (RoPE, grouped-query attention, SwiGLU), in float32."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def base_model(model_path: str | None) -> torch.nn.Module:
    if model_path is None:
        return tiny_llama()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


def peft_config(method: str):
    from xpeft import EtherConfig, PedroConfig, XPeftConfig

    if method in ("ether", "ether_plus"):
        return EtherConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], n_blocks=4, variant=method)
    if method.startswith("x_peft_"):
        mask_type = method.removeprefix("x_peft_")
        return XPeftConfig(task_type="CAUSAL_LM", bank_size=8, mask_type=mask_type, hard_k=2)
    if method == "pedro":
        return PedroConfig(task_type="CAUSAL_LM", vg_rank=4)
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed global batch: every sample has the same number of supervised tokens, so the mean of the ranks' losses
    is the loss of the whole batch and an N-rank run takes the same steps as a one-process run."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 96, (BATCH, SEQ_LEN), generator=generator)
    labels = input_ids.clone()
    labels[:, :PROMPT_LEN] = -100  # loss on the answer only; PEDRO pools the prompt, where labels are -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def shard(model) -> None:
    """Step 1 of the recipe: `fully_shard` each decoder layer (the classes transformers keeps whole), then the root."""
    layer_classes = set(getattr(model.base_model.model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)


def train(model, inputs: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def save(model, out: str) -> None:
    """Step 3 of the recipe: gather on every rank, write on rank 0."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(out, state_dict=state)
    dist.barrier()


def run(method: str, out: str, steps: int, lr: float, model_path: str | None) -> list[float]:
    import xpeft  # noqa: F401  (registers the methods with peft)

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = get_peft_model(base_model(model_path), peft_config(method)).to(device)
    shard(model)
    inputs = {key: value.chunk(world)[rank].to(device) for key, value in batch().items()}
    losses = train(model, inputs, steps, lr)
    save(model, os.path.join(out, method))
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["ether"])
    parser.add_argument("--out", default="outputs/fsdp2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--model", default=None, help="a local causal LM folder (default: a tiny seeded Llama)")
    args = parser.parse_args(argv)
    owns_group = not dist.is_initialized()  # a caller (e.g. tests/test_fsdp2.py) may have started it
    if owns_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        for method in args.method:
            losses = run(method, args.out, args.steps, args.lr, args.model)
            if dist.get_rank() == 0:
                print(f"{method}: rank-0 losses {[round(loss, 4) for loss in losses]}, saved to {args.out}/{method}")
    finally:
        if owns_group:
            dist.barrier()  # every rank idle before the group goes (gloo can abort a rank that exits mid-release)
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
