"""Tiny, seeded transformers models built from config classes (no Hub access), and matching inputs.

Every factory returns the same weights for the same name and seed, in any process, so a test can rebuild the base
model in a fresh process and compare outputs exactly. Sizes are chosen so that a forward pass takes milliseconds.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from packaging import version
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB_SIZE = 96
HIDDEN = 32
LAYERS = 2
HEADS = 4


def _llama() -> PreTrainedModel:
    # RoPE, grouped-query attention (2 kv heads for 4 query heads) and a SwiGLU feed-forward.
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# Shared by the encoder classifiers; a larger init range than the default 0.02 makes their tiny logits respond to
# adapters (with 0.02 the pooled logits barely move).
ENCODER_KWARGS = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_labels=2,
    initializer_range=0.2,
)


def _bert() -> PreTrainedModel:
    return BertForSequenceClassification(BertConfig(**ENCODER_KWARGS, max_position_embeddings=64))


def _roberta() -> PreTrainedModel:
    return RobertaForSequenceClassification(
        RobertaConfig(**ENCODER_KWARGS, max_position_embeddings=70, pad_token_id=1)
    )


def _deberta_v2() -> PreTrainedModel:
    config = DebertaV2Config(
        **ENCODER_KWARGS,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
    )
    return DebertaV2ForSequenceClassification(config)


def _gpt2() -> PreTrainedModel:
    # GPT-2 stores its projections in transformers' Conv1D, with weights of shape [in, out].
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _opt() -> PreTrainedModel:
    config = OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        ffn_dim=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        word_embed_proj_dim=HIDDEN,
        pad_token_id=1,
        enable_bias=True,
    )
    return OPTForCausalLM(config)


MODEL_FACTORIES = {
    "llama": _llama,
    "bert": _bert,
    "roberta": _roberta,
    "deberta-v2": _deberta_v2,
    "gpt2": _gpt2,
    "opt": _opt,
}
CAUSAL_LM_MODELS = ("llama", "gpt2", "opt")
SEQ_CLS_MODELS = ("bert", "roberta", "deberta-v2")


def make_model(name: str, seed: int = 0) -> PreTrainedModel:
    """Build the tiny model `name` with weights drawn from `seed`, in eval mode and float32."""
    torch.manual_seed(seed)
    model = MODEL_FACTORIES[name]()
    return model.eval()


def task_type(name: str) -> str:
    """peft's `task_type` for the model `name` ("CAUSAL_LM" or "SEQ_CLS")."""
    return "CAUSAL_LM" if name in CAUSAL_LM_MODELS else "SEQ_CLS"


def make_inputs(name: str, batch: int = 3, seq_len: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask for `name`; the last sample is right-padded by three tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[-1, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def output_tensor(output) -> torch.Tensor:
    """The logits of a transformers model output."""
    return output.logits


def kv_cache_names() -> list[str]:
    """The argument names a causal LM's forward takes its KV cache under: `past_key_values` everywhere, and `cache`
    from transformers 5.24 on (which renamed it, keeping the old name with a deprecation warning until 5.40)."""
    parameters = inspect.signature(LlamaForCausalLM.forward).parameters
    old_name_accepted = "past_key_values" in parameters or version.parse(transformers.__version__) < version.parse(
        "5.40"
    )
    return [
        name
        for name in ("cache", "past_key_values")
        if name in parameters or name == "past_key_values" and old_name_accepted
    ]


def kv_cache_of(output):
    """The KV cache in a model output, read by the field name the installed transformers uses (no deprecation)."""
    return output["cache"] if "cache" in output else output["past_key_values"]
