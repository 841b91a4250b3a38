"""X-PEFT's composed-adapter cache: an LRU bound per layer, exact keys, and many threads serving at once."""

from __future__ import annotations

import copy
import pickle
import random
import threading

import pytest
import torch
from peft import get_peft_model

from models import make_inputs, make_model, task_type
from xpeft import XPeftConfig
from xpeft.x_peft import layer as layer_module
from xpeft.x_peft.model import xpeft_layers

N = 8
PROFILES = [f"p{i}" for i in range(12)]


def config(**kwargs):
    kwargs = {
        "bank_size": N,
        "hard_k": 1,
        "reduction_factor": 4,
        "init_weights": False,
        "task_type": task_type("llama"),
    } | kwargs
    return XPeftConfig(**kwargs)


def build(profiles=PROFILES, mask_type="soft"):
    """A tiny Llama with X-PEFT profiles `profiles` (random masks, distinct per profile), frozen for serving."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config(mask_type=mask_type), adapter_name=profiles[0])
    for name in profiles[1:]:
        model.add_adapter(name, config(mask_type=mask_type))
    model.requires_grad_(False)
    return model.eval()


def first_layer(model):
    return xpeft_layers(model, PROFILES[0])[0][1]


def expected_composed(layer, name):
    """`(A*, a*, B*, b*)` of soft masks from the definition, in float64 (independent of `compose_adapter`)."""
    A, a, B, b = (t.double() for t in layer.xpeft_bank.layer(layer.layer_name))
    w_A = torch.softmax(layer.xpeft_mask_A[name].detach().double(), -1)
    w_B = torch.softmax(layer.xpeft_mask_B[name].detach().double(), -1)
    return (
        torch.einsum("n,nrd->rd", w_A, A),
        torch.einsum("n,nr->r", w_A, a),
        torch.einsum("n,ndr->dr", w_B, B),
        torch.einsum("n,nd->d", w_B, b),
    )


def assert_composed_close(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def assert_identical(actual, expected):
    assert all(torch.equal(got, want) for got, want in zip(actual, expected, strict=True))


@pytest.fixture
def cache_size(monkeypatch):
    def set_size(size):
        monkeypatch.setattr(layer_module, "COMPOSED_CACHE_SIZE", size)

    return set_size


# -- the LRU bound --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("profiles", "recomposed"), [(32, 0), (33, 33)])
def test_by_default_a_mixed_batch_of_32_profiles_is_served_from_the_cache(monkeypatch, profiles, recomposed):
    names = [f"q{i}" for i in range(profiles)]
    model = build(names)
    inputs = make_inputs("llama", batch=profiles)
    calls = []
    original = layer_module.compose_adapter

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(layer_module, "compose_adapter", counting)
    with torch.no_grad():
        model(**inputs, adapter_names=names)
        calls.clear()
        model(**inputs, adapter_names=names)
    layers = len(xpeft_layers(model, "q0"))
    assert len(calls) == recomposed * layers  # with 33, each profile in turn evicts the one needed next (LRU)


def test_entries_never_exceed_the_size_and_least_recently_used_go_first(cache_size):
    cache_size(3)
    layer = first_layer(build())
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(60):
            layer.composed(rng.choice(PROFILES))
            assert len(layer._composed_cache) <= 3
        layer._composed_cache.clear()
        for name in ("p0", "p1", "p2", "p0", "p3"):  # p0 is used again before p3 arrives, so p1 is the oldest
            layer.composed(name)
    assert list(layer._composed_cache) == ["p2", "p0", "p3"]


def test_a_lowered_size_applies_on_the_next_call(cache_size):
    layer = first_layer(build())
    with torch.no_grad():
        for name in PROFILES:
            layer.composed(name)
        assert len(layer._composed_cache) == len(PROFILES)
        cache_size(2)
        layer.composed("p11")  # a hit: still trims to the new size, keeping the most recently used
    assert list(layer._composed_cache) == ["p10", "p11"]


def test_hits_return_the_identical_objects_and_values_follow_the_definition():
    layer = first_layer(build())
    with torch.no_grad():
        first = layer.composed("p4")
        assert layer.composed("p4") is first
    assert_composed_close(first, expected_composed(layer, "p4"))


@pytest.mark.parametrize("write", ["in_place", "through_data"])
def test_changed_masks_miss(write):
    layer = first_layer(build())
    with torch.no_grad():
        before = layer.composed("p1")
        if write == "in_place":
            layer.xpeft_mask_B["p1"].mul_(-2.0)
        else:  # `.data` writes do not bump the version counter; the exact key still sees them
            layer.xpeft_mask_B["p1"].data.mul_(-2.0)
        after = layer.composed("p1")
    assert after is not before and not torch.allclose(after[2], before[2])
    assert_composed_close(after, expected_composed(layer, "p1"))


def test_a_new_bank_tensor_at_the_old_address_misses():
    # After e.g. `model.half(); model.float()` a new bank may land at the address of the old one, with other values.
    layer = first_layer(build())
    with torch.no_grad():
        before = layer.composed("p2")
        key = layer.layer_name.replace(".", "/")
        old = layer.xpeft_bank.parts["A"][key]
        old_address = old.data_ptr()
        same_address = torch.empty(0).set_(old.untyped_storage(), old.storage_offset(), old.shape, old.stride())
        layer.xpeft_bank.parts["A"][key] = same_address
        del old
        same_address.data.mul_(2.0)  # not seen by the version counter either
        after = layer.composed("p2")
    assert same_address.data_ptr() == old_address
    assert after is not before
    assert_composed_close(after, expected_composed(layer, "p2"))


def test_delete_adapter_clears_its_entry_and_the_batch():
    model = build()
    inputs = make_inputs("llama", batch=2)
    with torch.no_grad():
        model(**inputs, adapter_names=["p0", "p1"])
    layers = [layer for _, layer in xpeft_layers(model, "p1")]
    assert all("p1" in layer._composed_cache and layer._batch_cache is not None for layer in layers)
    model.delete_adapter("p1")
    assert all("p1" not in layer._composed_cache and layer._batch_cache is None for layer in layers)
    assert all("p0" in layer._composed_cache for layer in layers)


def test_size_zero_caches_nothing_and_gives_the_same_bits(cache_size):
    model = build()
    inputs = make_inputs("llama", batch=4)
    names = ["p0", "p3", "__base__", "p3"]
    with torch.no_grad():
        model(**inputs, adapter_names=names)
        cached = model(**inputs, adapter_names=names).logits  # served from the batch cache
        cache_size(0)
        uncached = model(**inputs, adapter_names=names).logits
        model.set_adapter("p3")
        alone = model(**inputs).logits
        cache_size(32)
        alone_cached = model(**inputs).logits
    assert torch.equal(cached, uncached)
    assert torch.equal(alone, alone_cached)
    cache_size(0)
    with torch.no_grad():
        model(**inputs, adapter_names=names)
    assert all(not layer._composed_cache and layer._batch_cache is None for _, layer in xpeft_layers(model, "p0"))


def test_a_batch_with_more_profiles_than_the_cache_holds_is_still_exact(cache_size):
    model = build()
    inputs = make_inputs("llama", batch=6)
    names = ["p0", "p1", "p2", "p3", "p4", "p5"]
    with torch.no_grad():
        cache_size(0)
        reference = model(**inputs, adapter_names=names).logits
        cache_size(2)  # each call evicts profiles it composed itself
        first = model(**inputs, adapter_names=names).logits
        second = model(**inputs, adapter_names=names).logits
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert all(len(layer._composed_cache) == 2 for _, layer in xpeft_layers(model, "p0"))


def test_the_batch_cache_hits_only_for_the_same_names_and_entries(cache_size):
    layer = first_layer(build())
    with torch.no_grad():
        batch = layer._batched(["p0", "p1"])
        assert layer._batched(["p0", "p1"]) is batch
        assert layer._batched(["p1", "p0"]) is not batch
        layer._composed_cache.pop("p0")  # p0 is recomposed: a new entry, so the stacked batch is rebuilt
        rebuilt = layer._batched(["p1", "p0"])
        assert rebuilt is not batch
        assert_identical(rebuilt, tuple(t.flip(0) for t in batch))


def test_an_invalid_size_is_refused_with_the_fix(cache_size):
    layer = first_layer(build())
    for size in (-1, 2.0, True):
        cache_size(size)
        with pytest.raises(ValueError, match=r"COMPOSED_CACHE_SIZE must be a non-negative int .* set it to e\.g\. 32"):
            layer.composed("p0")


def test_masks_in_training_bypass_the_cache():
    model = build()
    model.requires_grad_(False)
    layer = first_layer(model)
    layer.xpeft_mask_A["p0"].requires_grad_(True)
    composed = layer.composed("p0")
    assert composed[0].requires_grad and "p0" not in layer._composed_cache


# -- races within one thread: the entry's key is what it was composed from ------------------------------------------


def test_a_mask_written_while_composing_cannot_be_served_under_the_new_values(monkeypatch):
    layer = first_layer(build())
    original = layer_module.compose_adapter

    def compose_then_write(*args):
        result = original(*args)
        layer.xpeft_mask_A["p5"].data.add_(1.0)  # another thread trains or reloads p5 meanwhile
        return result

    monkeypatch.setattr(layer_module, "compose_adapter", compose_then_write)
    with torch.no_grad():
        layer.composed("p5")
    monkeypatch.setattr(layer_module, "compose_adapter", original)
    with torch.no_grad():
        now = layer.composed("p5")
    assert_composed_close(now, expected_composed(layer, "p5"))


def test_a_profile_deleted_while_composing_leaves_no_entry(monkeypatch):
    model = build()
    layer = first_layer(model)
    original = layer_module.compose_adapter

    def compose_then_delete(*args):
        layer.delete_adapter("p6")
        return original(*args)

    monkeypatch.setattr(layer_module, "compose_adapter", compose_then_delete)
    with torch.no_grad():
        layer.composed("p6")
    assert "p6" not in layer._composed_cache


def test_copies_and_pickles_start_with_empty_caches():
    model = build()
    inputs = make_inputs("llama", batch=2)
    with torch.no_grad():
        reference = model(**inputs, adapter_names=["p0", "p1"]).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [layer for _, layer in xpeft_layers(clone, "p0")]
        assert all(not layer._composed_cache and layer._batch_cache is None for layer in layers)
        with torch.no_grad():
            assert torch.equal(clone(**inputs, adapter_names=["p0", "p1"]).logits, reference)


# -- many threads -----------------------------------------------------------------------------------------------------


def test_eight_threads_get_their_own_profiles_exactly_while_entries_are_evicted(cache_size):
    cache_size(3)  # fewer entries than profiles: threads evict each other's entries all the time
    model = build()
    layers = [layer for _, layer in xpeft_layers(model, "p0")]
    generator = torch.Generator().manual_seed(3)
    batches = [
        ["p0", "p1", "p2", "p3", "p4"],  # more profiles than the cache holds
        ["p5", "__base__", "p5", "p6"],
        ["p7", "p8", "p9", "p10", "p11"],
        ["__base__", "__base__"],
        ["p11", "p0", "p11", "p3"],
    ]
    inputs = {id(layer): torch.randn(5, 4, layer.in_features, generator=generator) for layer in layers}
    with torch.no_grad():  # references, one thread, no cache
        cache_size(0)
        composed_ref = {(id(layer), name): layer.composed(name) for layer in layers for name in PROFILES}
        forward_ref = {
            (id(layer), i): layer(inputs[id(layer)][: len(names)], adapter_names=names)
            for layer in layers
            for i, names in enumerate(batches)
        }
        cache_size(3)
    distinct = {name: composed_ref[(id(layers[0]), name)][0] for name in PROFILES}
    assert all(not torch.equal(distinct[a], distinct[b]) for a in PROFILES for b in PROFILES if a < b)

    failures: list[str] = []
    start = threading.Barrier(8)

    def serve(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            with torch.no_grad():  # grad mode is per thread
                for _ in range(400):
                    layer = rng.choice(layers)
                    if rng.random() < 0.5:
                        name = rng.choice(PROFILES)
                        if not all(
                            torch.equal(a, b)
                            for a, b in zip(layer.composed(name), composed_ref[(id(layer), name)], strict=True)
                        ):
                            failures.append(f"thread {seed}: composed({name!r}) differs")
                    else:
                        i = rng.randrange(len(batches))
                        out = layer(inputs[id(layer)][: len(batches[i])], adapter_names=batches[i])
                        if not torch.equal(out, forward_ref[(id(layer), i)]):
                            failures.append(f"thread {seed}: mixed batch {batches[i]} differs")
                    with layer._cache_lock:  # between an insert and its eviction, only the lock holder looks
                        entries = len(layer._composed_cache)
                    if entries > 3:
                        failures.append(f"thread {seed}: {entries} entries")
        except Exception as error:  # noqa: BLE001 -- reported below with the thread that raised it
            failures.append(f"thread {seed}: {error!r}")

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (deadlock?)"
    assert not failures, failures[:5]


def test_results_composed_in_inference_mode_are_not_kept():
    """A request served under `torch.inference_mode()` must not leave inference tensors in the cache: a later forward
    with gradients (e.g. input saliency with the profile frozen) would fail inside torch."""
    model = build()
    inputs = make_inputs("llama")
    with torch.inference_mode():
        model(input_ids=inputs["input_ids"], adapter_names=PROFILES[:3])
    layer = first_layer(model)
    assert not any(entry.composed[0].is_inference() for entry in layer._composed_cache.values())
    assert layer._batch_cache is None or not layer._batch_cache[1][0].is_inference()
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=embeds, adapter_names=PROFILES[:3]).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
