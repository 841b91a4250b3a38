"""PEDRO against independent math: identity init, a float64 reference forward, causality, options, errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from models import kv_cache_names, kv_cache_of, make_inputs, make_model, task_type
from xpeft import PedroConfig
from xpeft.pedro.generator import GELU_DENOMINATOR, GELU_NUMERATOR, rational

ROLES = {"q_proj": "q", "v_proj": "v", "up_proj": "u"}


def perturbed(model, std=0.3, seed=0, **config):
    """A PEDRO model on `model` with every adapter parameter moved away from its identity init."""
    peft_model = get_peft_model(model, PedroConfig(**{"vg_rank": 4, "task_type": "CAUSAL_LM", **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "pedro_" in name:
                param.add_(std * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))
    return peft_model.eval()


def prompt_batch(padding_side: str):
    """Three samples with prompts of 4, 6 and 5 tokens; the last one is padded by 3 tokens on `padding_side`."""
    inputs = make_inputs("llama", batch=3, seq_len=10)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    if padding_side == "left":
        attention_mask = attention_mask.flip(1)
    prompt = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, (length, start) in enumerate([(4, 0), (6, 0), (5, 3 if padding_side == "left" else 0)]):
        prompt[row, start : start + length] = True
    labels = torch.where(prompt | (attention_mask == 0), -100, input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, prompt


# -- the independent reference (float64, per-sample loops, explicit formulas) -----------------------------------------


def ref_activation(x, activation, numerator=None, denominator=None):
    if activation == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if activation == "relu":
        return torch.clamp(x, min=0)
    p = sum(numerator[i] * x**i for i in range(len(numerator)))
    q = 1 + torch.abs(sum(denominator[j - 1] * x**j for j in range(1, len(denominator) + 1)))
    return p / q


def ref_pool(hidden, prompt, pooler, score):
    rows = []
    for b in range(hidden.shape[0]):
        h = hidden[b, prompt[b]]
        if len(h) == 0:
            rows.append(torch.zeros(hidden.shape[-1], dtype=hidden.dtype))
        elif pooler == "mean":
            rows.append(h.mean(0))
        elif pooler == "last":
            rows.append(h[-1])
        else:
            a = torch.softmax(h @ score, dim=0)
            rows.append((a[:, None] * h).sum(0))
    return torch.stack(rows)


def reference_logits(peft_model, inputs, prompt, pooler, activation, generator_input="normalized"):
    """The base model with hooks that scale q, v and up outputs by vectors computed here from the PEDRO weights."""
    base = make_model("llama").double()
    state = dict(peft_model.named_parameters())
    handles, vectors, block_inputs = [], {}, {}
    for index, block in enumerate(base.model.layers):
        prefix = f"base_model.model.model.layers.{index}."

        def keep_input(module, args, kwargs, index=index):
            block_inputs[index] = args[0] if args else kwargs["hidden_states"]

        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))

        def param(path, _prefix=prefix):
            return state[_prefix + path].detach()

        def hook(module, args, output, role, index=index, param=param):
            if role == "q":  # the generator reads the block's normalised input (the input of q_proj) or the block input
                gen = "self_attn.q_proj.pedro_generator.default."
                score = param(gen + "score") if pooler == "attention" else None
                hidden = args[0] if generator_input == "normalized" else block_inputs[index]
                pooled = ref_pool(hidden, prompt, pooler, score)
                pre = pooled @ param(gen + "down.weight").T + param(gen + "down.bias")
                if activation == "rational":
                    num, den = param(gen + "act.numerator"), param(gen + "act.denominator")
                    vectors[index] = ref_activation(pre, activation, num, den)
                else:
                    vectors[index] = ref_activation(pre, activation)
            path = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "u": "mlp.up_proj"}[role]
            up_w, up_b = param(path + ".pedro_up.default.weight"), param(path + ".pedro_up.default.bias")
            scale = 1 + vectors[index] @ up_w.T + up_b
            return output * scale[:, None, :]

        for name, role in ROLES.items():
            module = block.self_attn if role != "u" else block.mlp
            module = getattr(module, name)
            handles.append(module.register_forward_hook(lambda m, a, o, role=role, hook=hook: hook(m, a, o, role)))
    with torch.no_grad():
        out = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    for handle in handles:
        handle.remove()
    return out


# -- tests ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "opt", "bert"])
def test_init_equals_base_exactly(model_name):
    inputs = make_inputs(model_name)
    with torch.no_grad():
        base = make_model(model_name)(**inputs).logits
        model = get_peft_model(make_model(model_name), PedroConfig(task_type=task_type(model_name))).eval()
        torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("pooler", ["attention", "mean", "last"])
@pytest.mark.parametrize("activation", ["rational", "gelu", "relu"])
def test_matches_float64_reference(pooler, activation):
    inputs, prompt = prompt_batch("right")
    model = perturbed(make_model("llama").double(), pooler=pooler, activation=activation)
    with torch.no_grad():
        actual = model(**inputs).logits
    expected = reference_logits(model, inputs, prompt, pooler, activation)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(actual, make_model("llama").double()(**inputs).logits, atol=1e-3)


@pytest.mark.parametrize("pooler", ["attention", "last"])
def test_block_input_generator_matches_float64_reference(pooler):
    """`generator_input="block"`: the generators pool the block input (the residual stream), not the q_proj input."""
    inputs, prompt = prompt_batch("left")
    model = perturbed(make_model("llama").double(), pooler=pooler, generator_input="block")
    with torch.no_grad():
        actual = model(**inputs).logits
    expected = reference_logits(model, inputs, prompt, pooler, "rational", generator_input="block")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    normalized = reference_logits(model, inputs, prompt, pooler, "rational")
    assert not torch.allclose(actual, normalized, atol=1e-3), "the block input made no difference"


def test_block_input_generator_under_checkpointing_generate_and_mixed_batches(tmp_path):
    """The block input is kept per block and per forward: checkpointed recomputes, decode steps and a mixed batch of
    a "block" and a "normalized" adapter each get their own prompt's vectors, and the choice survives a reload."""
    inputs, _ = prompt_batch("left")
    grads = []
    for checkpointing in (False, True):
        model = perturbed(make_model("llama").double(), generator_input="block")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)

    model = perturbed(make_model("llama").double(), generator_input="block").eval()
    model.add_adapter("normalized", PedroConfig(vg_rank=4, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".normalized." in name:
                param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)).double())
        names = ["default", "normalized", "default"]
        mixed = model(**inputs, adapter_names=names).logits
        alone = []
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone.append(model(**{k: v[row : row + 1] for k, v in inputs.items()}).logits)
        torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-9, atol=1e-9)
        model.set_adapter("default")
        prompt_ids = inputs["input_ids"][:1, :4]
        generated = model.generate(input_ids=prompt_ids, max_new_tokens=3, do_sample=False)
        # Without a cache, on the full text with the same prompt: the same last greedy token.
        full = model(input_ids=generated[:, :-1], prompt_lengths=torch.tensor([4])).logits[:, -1]
        assert torch.equal(full.argmax(-1), generated[:, -1])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model("llama").double(), tmp_path).eval()
    assert reloaded.peft_config["default"].generator_input == "block"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["labels", "prompt_mask", "prompt_lengths", "none"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_prompt_boundary_sources(source, padding_side):
    """labels, an explicit mask and explicit lengths give the same prompt; without any, the whole input is prompt."""
    inputs, prompt = prompt_batch(padding_side)
    model = perturbed(make_model("llama").double())
    call = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if source == "labels":
        call["labels"] = inputs["labels"]
    elif source == "prompt_mask":
        call["prompt_mask"] = prompt
    elif source == "prompt_lengths":
        call["prompt_lengths"] = torch.tensor([4, 6, 5])
    else:
        prompt = inputs["attention_mask"].bool()
    with torch.no_grad():
        actual = model(**call).logits
    expected = reference_logits(model, inputs, prompt, "attention", "rational")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def capture_codes(model):
    """Forward hooks that record each vector generator's output z."""
    codes, handles = [], []
    for name, module in model.named_modules():
        if name.endswith("pedro_generator.default"):
            handles.append(module.register_forward_hook(lambda m, a, out: codes.append(out.detach().clone())))
    return codes, handles


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causality(padding_side):
    inputs, prompt = prompt_batch(padding_side)
    model = perturbed(make_model("llama"))
    codes, _ = capture_codes(model)
    with torch.no_grad():
        first = model(**inputs).logits
        first_codes = list(codes)
        # Change every response token and every padding token: codes and prompt-position logits must not move.
        codes.clear()
        changed = dict(inputs)
        changed["input_ids"] = torch.where(prompt, inputs["input_ids"], (inputs["input_ids"] + 7) % 90 + 3)
        changed["labels"] = torch.where(inputs["labels"] == -100, -100, changed["input_ids"])
        second = model(**changed).logits
        for a, b in zip(first_codes, codes, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(second[prompt], first[prompt], rtol=1e-6, atol=1e-6)
        # Change one prompt token of sample 0 only: its codes move, the other samples' do not.
        codes.clear()
        changed = {k: v.clone() for k, v in inputs.items()}
        position = prompt[0].nonzero()[0, 0]
        changed["input_ids"][0, position] = (changed["input_ids"][0, position] + 1) % 90 + 3
        model(**changed)
        for a, b in zip(first_codes, codes, strict=True):
            assert not torch.allclose(a[0], b[0], atol=1e-6)
            torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)


def test_gpt2_fused_projection_scales_query_and_value_only():
    inputs = make_inputs("gpt2")
    model = perturbed(make_model("gpt2"))
    outputs = {}
    base = make_model("gpt2")
    base.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, a, o: outputs.setdefault("base", o))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    layer.register_forward_hook(lambda m, a, o: outputs.setdefault("pedro", o))
    with torch.no_grad():
        base(**inputs)
        model(**inputs)
    d = 32
    torch.testing.assert_close(outputs["pedro"][..., d : 2 * d], outputs["base"][..., d : 2 * d], rtol=0, atol=0)
    for low in (0, 2 * d):
        assert not torch.allclose(outputs["pedro"][..., low : low + d], outputs["base"][..., low : low + d])


def test_bert_accepts_prompt_arguments_through_peft_forward():
    """BERT's forward does not take unknown keywords: PEDRO must consume its own before the base model sees them."""
    inputs = make_inputs("bert")
    model = perturbed(make_model("bert"), std=0.5, task_type="SEQ_CLS")
    with torch.no_grad():
        lengths = torch.tensor([3, 5, 4])
        by_lengths = model(**inputs, prompt_lengths=lengths).logits
        mask = torch.arange(10)[None, :] < lengths[:, None]
        by_mask = model(**inputs, prompt_mask=mask).logits
        whole = model(**inputs).logits
    torch.testing.assert_close(by_lengths, by_mask, rtol=0, atol=0)
    assert not torch.allclose(by_lengths, whole, atol=1e-5)


def test_token_classification_labels_do_not_set_the_prompt():
    """Token labels of a non-causal model mark unlabelled tokens ([CLS] = -100), not a prompt: they are ignored."""
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    base = BertForTokenClassification(make_model("bert").config)
    model = get_peft_model(base, PedroConfig(vg_rank=4, task_type="TOKEN_CLS", init_weights=False)).eval()
    inputs = make_inputs("bert")
    labels = torch.randint(0, 2, inputs["input_ids"].shape)
    labels[:, 0] = -100  # [CLS] is unlabelled, as Hugging Face tokenizers emit it
    with torch.no_grad():
        with_labels = model(**inputs, labels=labels).logits
        without_labels = model(**inputs).logits
        cls_only = model(**inputs, prompt_lengths=torch.ones(3, dtype=torch.long)).logits
    torch.testing.assert_close(with_labels, without_labels, rtol=0, atol=0)
    assert not torch.allclose(with_labels, cls_only, atol=1e-5)  # the prompt matters: [CLS] alone differs


def test_rational_initialisation_approximates_gelu():
    x = torch.linspace(-3, 3, 2001, dtype=torch.float64)
    approx = rational(x, torch.tensor(GELU_NUMERATOR, dtype=torch.float64), torch.tensor(GELU_DENOMINATOR).double())
    exact = torch.nn.functional.gelu(x)
    assert (approx - exact).abs().max() < 0.01


def test_not_mergeable_layer_level():
    model = perturbed(make_model("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="cannot be merged") as layer_error:
        layer.merge()
    with pytest.raises(ValueError, match="cannot be merged") as model_error:
        model.merge_adapter()
    reason = "computed from each prompt at run time"
    assert reason in str(layer_error.value) and reason in str(model_error.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": "q_proj"}, "must be a list of module names"),
        ({"vg_rank": 0}, "`vg_rank` must be a positive integer"),
        ({"pooler": "max"}, "`pooler` must be"),
        ({"activation": "tanh"}, "`activation` must be"),
        ({"layers_pattern": "layers"}, "`layers_pattern` is set but `layers_to_transform` is None"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PedroConfig(**kwargs)


@pytest.mark.parametrize(
    ("model_name", "targets", "match"),
    [
        ("llama", ["q_proj", "k_proj"], r"contains \['k_proj'\].*choose among"),
        ("llama", ["up_proj"], "no query or value projection"),
    ],
)
def test_target_errors(model_name, targets, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(make_model(model_name), PedroConfig(target_modules=targets))


def test_unknown_model_type_errors():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="model type 'gpt_neox'.*supported model types"):
        get_peft_model(GPTNeoXForCausalLM(config), PedroConfig())


def test_value_only_target_holds_generator():
    """With only v_proj (and up_proj) targeted, the generator sits in v_proj and still reads the block input."""
    inputs = make_inputs("llama")
    model = perturbed(make_model("llama"), target_modules=["v_proj", "up_proj"])
    assert "default" in model.base_model.model.model.layers[0].self_attn.v_proj.pedro_generator
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, make_model("llama")(**inputs).logits, atol=1e-4)


def test_excluding_one_blocks_query_moves_its_generator_to_the_value_projection():
    """`exclude_modules` removing block 0's q_proj: that block's generator sits in v_proj; block 1's stays in q_proj."""
    inputs = make_inputs("llama")
    model = perturbed(make_model("llama"), exclude_modules=["model.layers.0.self_attn.q_proj"])
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "pedro_up")
    assert "default" in layers[0].self_attn.v_proj.pedro_generator
    assert "default" in layers[1].self_attn.q_proj.pedro_generator
    assert "default" not in layers[1].self_attn.v_proj.pedro_generator
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, make_model("llama")(**inputs).logits, atol=1e-4)


def test_excluding_a_blocks_query_and_value_but_not_its_ffn_errors_at_injection():
    excluded = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"none of block 'model.layers.0'.*query or value.*exclude_modules"):
        get_peft_model(make_model("llama"), PedroConfig(exclude_modules=excluded))


def test_module_outside_numbered_blocks_errors():
    from xpeft.pedro.model import PedroModel

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = make_model("llama").config
            self.q_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no block index.*numbered transformer blocks.*target_modules"):
        PedroModel(Flat(), PedroConfig(target_modules=["q_proj"]), "default")


def test_prompt_mask_shape_error():
    inputs = make_inputs("llama")
    model = perturbed(make_model("llama"))
    with pytest.raises(ValueError, match="prompt mask has shape"):
        model(**inputs, prompt_mask=torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_name", kv_cache_names())
def test_continuing_foreign_cache_errors(cache_name):
    """A KV cache started without this PEDRO adapter has no vectors to reuse: clear error, not silent garbage."""
    inputs = make_inputs("llama")
    model = perturbed(make_model("llama"))
    with torch.no_grad():
        with model.disable_adapter():
            cache = kv_cache_of(model(**inputs, use_cache=True))
        model.add_adapter("fresh", PedroConfig(vg_rank=4, task_type="CAUSAL_LM"))
        model.set_adapter("fresh")
        step = {"input_ids": inputs["input_ids"][:, :1], cache_name: cache}
        with pytest.raises(ValueError, match="no vectors for it"):
            model.base_model.model(**step)


def test_config_help_matches_docstring():
    import dataclasses
    import re

    doc = " ".join(PedroConfig.__doc__.split())
    for item in dataclasses.fields(PedroConfig):
        if item.name not in PedroConfig.__annotations__:
            continue  # inherited from peft's PeftConfig
        entry = re.search(rf"{item.name} \(`[^)]*`(?:, \*optional\*)?\): (.*?)(?= \w+ \(`|$)", doc)
        assert entry, item.name
        assert entry.group(1).strip() == " ".join(item.metadata["help"].split()), item.name


def test_init_weights_false_is_not_identity():
    inputs = make_inputs("llama")
    model = get_peft_model(make_model("llama"), PedroConfig(init_weights=False)).eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, make_model("llama")(**inputs).logits, atol=1e-5)


def test_layers_to_transform_and_exclude_modules():
    model = get_peft_model(make_model("llama"), PedroConfig(layers_to_transform=[1], layers_pattern="layers"))
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "pedro_up")
    assert "default" in layers[1].self_attn.q_proj.pedro_generator
    model = get_peft_model(make_model("llama"), PedroConfig(exclude_modules=["up_proj"]))
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].mlp.up_proj, "pedro_up") and hasattr(layers[0].self_attn.v_proj, "pedro_up")


def test_unload_gives_back_the_base_model_without_hooks():
    inputs = make_inputs("bert")
    model = perturbed(make_model("bert"), std=0.5, task_type="SEQ_CLS")
    base = model.unload().eval()
    assert not base._forward_pre_hooks and not base._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, make_model("bert")(**inputs).logits, rtol=0, atol=0)


def test_labels_without_prompt_warn_and_pool_to_zero():
    """labels == input_ids everywhere: no prompt token; PEDRO warns and uses a zero pooled vector (finite output)."""
    inputs = make_inputs("llama")
    model = perturbed(make_model("llama").double())
    with pytest.warns(UserWarning, match="no prompt tokens"):
        with torch.no_grad():
            actual = model(**inputs, labels=inputs["input_ids"]).logits
    empty = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    expected = reference_logits(model, inputs, empty, "attention", "rational")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def _tiny(model_type):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    common |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(0)
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return make_model(model_type)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("mistral", {"q_proj": 32, "v_proj": 16, "up_proj": 64}),
        ("qwen2", {"q_proj": 32, "v_proj": 16, "up_proj": 64}),
        ("roberta", {"query": 32, "value": 32, "dense": 64}),
        ("deberta-v2", {"query_proj": 32, "value_proj": 32, "dense": 64}),
    ],
)
def test_default_targets_per_architecture(model_type, expected):
    """Defaults wrap exactly the q, v and FFN-up projections, with vectors of their output size (GQA: kv size)."""
    model = get_peft_model(_tiny(model_type), PedroConfig(vg_rank=4))
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "pedro_up") and (".layers.0." in name or ".layer.0." in name):
            found[name.rsplit(".", 1)[-1]] = module.pedro_up["default"].out_features
    assert found == expected


def test_activation_checkpointing_gives_the_same_gradients():
    """Checkpointed blocks are recomputed during backward, outside the model forward: same prompt, same gradients."""
    inputs, _ = prompt_batch("left")
    grads = []
    for checkpointing in (False, True):
        model = perturbed(make_model("llama").double())
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_ffn_projection_alone_errors():
    model = perturbed(make_model("llama"))
    up_proj = model.base_model.model.model.layers[0].mlp.up_proj
    with pytest.raises(RuntimeError, match="ran before the block.s vector generator"):
        up_proj(torch.randn(1, 3, 32))


def test_query_projection_alone_with_block_input_generator_errors():
    """Outside its block the query projection cannot know the block input: an error, not the q_proj input instead."""
    model = perturbed(make_model("llama"), generator_input="block")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="pools the block input .* outside a call of its block"):
        q_proj(torch.randn(1, 3, 32))
    from xpeft.pedro.layer import CURRENT_FORWARD

    assert CURRENT_FORWARD.get() is None, "the failed call left its state (and block input) behind"


def test_output_cache_read_never_touches_the_deprecated_field(monkeypatch):
    """transformers 5.24 logs a deprecation whenever `past_key_values` is read off an output: PEDRO reads the fields."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils.generic import ModelOutput

    from xpeft.pedro.model import _output_cache

    def deprecated(self, *args):
        if not args or args[0] == "past_key_values":
            raise AssertionError("the deprecated field was read")
        return args[0]

    # The attribute, and (transformers 5.24+) the renaming behind `get`, `in` and `[]` that logs the deprecation.
    monkeypatch.setattr(CausalLMOutputWithPast, "past_key_values", property(deprecated), raising=False)
    if hasattr(ModelOutput, "_replace_old_cache_name"):
        monkeypatch.setattr(ModelOutput, "_replace_old_cache_name", deprecated)
    cache = DynamicCache()
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert _output_cache(CausalLMOutputWithPast(logits=torch.zeros(1), **{field: cache})) is cache
    assert _output_cache(CausalLMOutputWithPast(logits=torch.zeros(1))) is None
    assert _output_cache((torch.zeros(1), cache)) is cache
