"""The bad-input catalogue: hostile or damaged inputs as users produce them, each refused with the problem and the fix.

Every case asserts the exception type and the words of its message. None may end in a torch-internal error, an OOM,
or a silent result (an adapter that loads but computes something else). The saved adapters are built once per module
and copied into each case's own folder before it is damaged.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import models
from models import kv_cache_of, make_inputs, make_model
from xpeft import EtherConfig, PedroConfig, XPeftConfig
from xpeft.serialization import recipe_fingerprint
from xpeft.x_peft.bank import random_bank_recipe

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
N = 8  # X-PEFT bank size of the saved profiles
RESAVE = r".*re-save"
CAUSE = r".*edited after saving.*another base model.*Load it with the config and base model it was saved with"
HEX64 = "[0-9a-f]{64}"


def llama(**sizes):
    """`make_model("llama")` with other module-level sizes of tests/models.py (e.g. HIDDEN=64, LAYERS=1)."""
    saved = {name: getattr(models, name) for name in sizes}
    try:
        for name, value in sizes.items():
            setattr(models, name, value)
        return make_model("llama")
    finally:
        for name, value in saved.items():
            setattr(models, name, value)


SAVED = {
    "ether": lambda: (llama(), EtherConfig(target_modules=["q_proj", "v_proj"], n_blocks=4, init_weights=False)),
    "ether_plus": lambda: (
        llama(),
        EtherConfig(target_modules=["q_proj", "v_proj"], n_blocks=4, variant="ether_plus", init_weights=False),
    ),
    "ether_plus_one_sided": lambda: (
        llama(),
        EtherConfig(target_modules=["q_proj"], n_blocks=4, variant="ether_plus_one_sided", init_weights=False),
    ),
    "pedro": lambda: (llama(), PedroConfig(vg_rank=4, task_type="CAUSAL_LM", init_weights=False)),
    "xpeft": lambda: (
        llama(),
        XPeftConfig(bank_size=N, reduction_factor=4, init_weights=False, task_type="CAUSAL_LM"),
    ),
    "xpeft_layer0": lambda: (
        llama(),
        XPeftConfig(bank_size=N, reduction_factor=4, target_modules=["down_proj"], layers_to_transform=[0]),
    ),
    "xpeft_head": lambda: (make_model("bert"), XPeftConfig(bank_size=N, reduction_factor=4, task_type="SEQ_CLS")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved adapter folder per entry of `SAVED`, built once for the module."""
    root = tmp_path_factory.mktemp("saved")
    for kind, build in SAVED.items():
        torch.manual_seed(0)
        base, config = build()
        get_peft_model(base, config).save_pretrained(root / kind)
    return root


@pytest.fixture
def folder_of(saved, tmp_path):
    """`folder_of(kind)`: a fresh copy of the saved adapter `kind`, for one case to damage."""
    return lambda kind: shutil.copytree(saved / kind, tmp_path / kind)


# -- ways to damage a saved adapter -------------------------------------------------------------------------------


def set_config(**changes):
    def mutate(folder):
        path = folder / CONFIG
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return mutate


def drop_config(key):
    def mutate(folder):
        path = folder / CONFIG
        config = json.loads(path.read_text())
        del config[key]
        path.write_text(json.dumps(config))

    return mutate


def edit_tensors(change):
    """Apply `change(tensors)` (in place on the dict of the weights file) and save the file again."""

    def mutate(folder):
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return mutate


def fill_first(value, containing=""):
    def change(tensors):
        name = next(k for k in sorted(tensors) if containing in k and tensors[k].is_floating_point())
        tensors[name] = torch.full_like(tensors[name], value)

    return edit_tensors(change)


def drop_first(containing):
    def change(tensors):
        del tensors[next(k for k in sorted(tensors) if containing in k)]

    return edit_tensors(change)


def as_integers(tensors):
    for name in tensors:
        tensors[name] = tensors[name].round().long()


def add_base_weight(tensors):
    # A tensor named like a base-model weight: loading it would overwrite the base model's own q_proj.
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(32, 32)


def write_bytes(make):
    def mutate(folder):
        path = folder / WEIGHTS
        path.write_bytes(make(path.read_bytes()))

    return mutate


def header_with(entries: dict, data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


def legacy_fingerprint(folder):
    # The fingerprint xpeft 0.1 recorded for a random bank: the recipe without the adapted layers (and a config
    # without `bank_init_scale`, which came later).
    path = folder / CONFIG
    saved = json.loads(path.read_text())
    del saved["bank_init_scale"]
    path.write_text(json.dumps(saved | {"bank_fingerprint": recipe_fingerprint(random_bank_recipe(0, N, 4, "relu"))}))


def remove(name):
    return lambda folder: (folder / name).unlink()


def bert():
    return make_model("bert")


# -- loading a damaged adapter: (id, saved kind, damage, base model, error, message) ---------------------------------

LOAD_CASES = [
    # A. the X-PEFT bank check cannot be bypassed
    (
        "xpeft-fingerprint-removed",
        "xpeft",
        drop_config("bank_fingerprint"),
        llama,
        ValueError,
        rf"{CONFIG} has no `bank_fingerprint`.*could silently load against another.*Restore the field.*re-save",
    ),
    (
        "xpeft-fingerprint-null",
        "xpeft",
        set_config(bank_fingerprint=None),
        llama,
        ValueError,
        rf"{CONFIG} has no `bank_fingerprint`.*Restore the field",
    ),
    (
        "xpeft-profile-on-wider-model",
        "xpeft",
        lambda folder: None,
        lambda: llama(HIDDEN=64),
        ValueError,
        rf"trained against bank {HEX64}, but its config describes bank {HEX64}.*d=64\).*not the one the profile "
        r"was trained on \(other layer names or sizes\).*Load it with the bank and base model",
    ),
    (
        "xpeft-layers-to-transform-edited",
        "xpeft_layer0",
        set_config(layers_to_transform=[1]),
        llama,
        ValueError,
        rf"trained against bank {HEX64}, but its config describes bank.*'model\.layers\.1\.mlp\.down_proj'.*edited "
        "after saving",
    ),
    (
        "xpeft-legacy-fingerprint",
        "xpeft",
        legacy_fingerprint,
        llama,
        ValueError,
        rf"random-bank fingerprint of xpeft 0\.1, which does not cover the adapted layers.*set its `bank_fingerprint` "
        rf"to {HEX64}",
    ),
    # B. loaded tensors are checked against the config and the model
    (
        "ether-plus-edited-to-ether",
        "ether_plus",
        set_config(variant="ether"),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 12 tensor\(s\) that this model's ETHER adapter 'default' has no place for: "
        rf".*ether_u_out.*silently drop them{CAUSE}",
    ),
    (
        "ether-one-sided-edited-to-two-sided",
        "ether_plus_one_sided",
        set_config(variant="ether_plus"),
        llama,
        ValueError,
        rf"{WEIGHTS} lacks 4 tensor\(s\) that this model's ETHER adapter 'default' needs: .*ether_u_out.*keep their "
        rf"initial values{CAUSE}",
    ),
    (
        "ether-target-added",
        "ether",
        set_config(target_modules=["q_proj", "v_proj", "k_proj"]),
        llama,
        ValueError,
        rf"{WEIGHTS} lacks 2 tensor\(s\).*k_proj\.ether_u{CAUSE}",
    ),
    (
        "ether-target-removed",
        "ether",
        set_config(target_modules=["q_proj"]),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 2 tensor\(s\).*no place for.*v_proj\.ether_u{CAUSE}",
    ),
    (
        "ether-n-blocks-edited",
        "ether",
        set_config(n_blocks=8),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*ether_u' has shape \[4, 8\] but this model's adapter 'default' expects \[8, 4\]\. "
        rf"{CAUSE}",
    ),
    (
        "ether-on-wider-model",
        "ether",
        lambda folder: None,
        lambda: llama(HIDDEN=64),
        ValueError,
        rf"{WEIGHTS}: tensor '.*q_proj\.ether_u' has shape \[4, 8\] but .* expects \[4, 16\]\. {CAUSE}",
    ),
    (
        "ether-nan",
        "ether",
        fill_first(float("nan")),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*ether_u' holds 32 NaN or infinite value\(s\) of 32: the file is corrupted.*Re-save it "
        "from a healthy model, or retrain it",
    ),
    (
        "ether-plus-inf",
        "ether_plus",
        fill_first(float("inf"), "ether_v_out"),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*ether_v_out' holds \d+ NaN or infinite.*Re-save it",
    ),
    (
        "ether-integer-tensors",
        "ether",
        edit_tensors(as_integers),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*ether_u' has dtype torch\.int64, but the model's is torch\.float32.*not written by "
        "`save_pretrained`.*Re-save the adapter",
    ),
    (
        "ether-base-weight-smuggled-in",
        "ether",
        edit_tensors(add_base_weight),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 1 tensor\(s\) .* no place for: 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
        rf"base_layer\.weight'{CAUSE}",
    ),
    (
        "ether-folder-labelled-pedro",
        "ether",
        set_config(peft_type="PEDRO"),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 4 tensor\(s\) that this model's PEDRO adapter 'default' has no place for{CAUSE}",
    ),
    (
        "pedro-on-model-with-fewer-layers",
        "pedro",
        lambda folder: None,
        lambda: llama(LAYERS=1),
        ValueError,
        rf"{WEIGHTS} holds \d+ tensor\(s\) that this model's PEDRO adapter 'default' has no place for: "
        rf"'base_model\.model\.model\.layers\.1\..*silently drop them{CAUSE}",
    ),
    (
        "pedro-pooler-edited",
        "pedro",
        set_config(pooler="mean"),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 2 tensor\(s\) .* no place for: .*pedro_generator\.score{CAUSE}",
    ),
    (
        "pedro-activation-edited",
        "pedro",
        set_config(activation="gelu"),
        llama,
        ValueError,
        rf"{WEIGHTS} holds \d+ tensor\(s\) .* no place for: .*pedro_generator{CAUSE}",
    ),
    (
        "pedro-vg-rank-edited",
        "pedro",
        set_config(vg_rank=6),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*' has shape \[\d+, 4\] but this model's adapter 'default' expects \[\d+, 6\]",
    ),
    (
        "pedro-tensor-missing",
        "pedro",
        drop_first("pedro_up"),
        llama,
        ValueError,
        rf"{WEIGHTS} lacks 1 tensor\(s\) that this model's PEDRO adapter 'default' needs: .*pedro_up.*keep their "
        "initial values",
    ),
    (
        "pedro-inf",
        "pedro",
        fill_first(float("-inf"), "pedro_up"),
        llama,
        ValueError,
        rf"{WEIGHTS}: tensor '.*pedro_up.*' holds \d+ NaN or infinite value\(s\).*Re-save it",
    ),
    (
        "xpeft-extra-tensor",
        "xpeft",
        edit_tensors(lambda tensors: tensors.update({"base_model.model.lm_head.weight": torch.zeros(96, 32)})),
        llama,
        ValueError,
        rf"{WEIGHTS} holds 1 tensor\(s\) that this model's XPEFT adapter 'default' has no place for: "
        rf"'base_model\.model\.lm_head\.weight'{CAUSE}",
    ),
    (
        "xpeft-head-nan",
        "xpeft_head",
        fill_first(float("nan"), "classifier"),
        bert,
        ValueError,
        rf"{WEIGHTS}: tensor '.*classifier.*' holds \d+ NaN or infinite.*Re-save it",
    ),
    (
        "xpeft-soft-masks-nan",
        "xpeft",
        fill_first(float("nan"), "xpeft_masks"),
        llama,
        ValueError,
        rf"{WEIGHTS}: The profile's mask logits contain NaN or inf: the file is corrupted; re-save it",
    ),
    (
        "xpeft-mask-type-edited",
        "xpeft",
        set_config(mask_type="hard", hard_k=1),
        llama,
        ValueError,
        rf"{WEIGHTS}: Hard X-PEFT masks for this model are 4 bytes of uint8.*saved for another model or config",
    ),
    # C. damaged files are named, with the fix
    (
        "weights-truncated",
        "ether",
        write_bytes(lambda data: data[:-10]),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: the header lists \d+ bytes of tensor data, but the file holds \d+\. "
        "The file is truncated or corrupted\\. Re-save the adapter with `save_pretrained`",
    ),
    (
        "weights-garbage",
        "pedro",
        write_bytes(lambda data: bytes(range(256)) * 4),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: the header length \d+ exceeds the 1016 bytes after it.*Re-save the "
        "adapter",
    ),
    (
        "weights-empty",
        "xpeft",
        write_bytes(lambda data: b""),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: the file has 0 bytes, fewer than the 8.*Re-save the adapter",
    ),
    (
        "weights-header-not-json",
        "ether",
        write_bytes(lambda data: struct.pack("<Q", 4) + b"\xff\xfe{[" + data[12:]),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: the header is not JSON.*Re-save the adapter",
    ),
    (
        "weights-tensor-size-lies",
        "ether",
        write_bytes(lambda data: header_with({"a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]}}, data)),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: tensor 'a' \(F32 \[4, 8\]\) spans 64 bytes.*Re-save the adapter",
    ),
    (
        "weights-tensors-overlap",
        "ether",
        write_bytes(
            lambda data: header_with(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            )
        ),
        llama,
        ValueError,
        rf"deserializing header of .*{WEIGHTS}: the data of tensor 'b' starts at byte 4, expected 8.*Re-save",
    ),
    (
        "weights-missing",
        "ether",
        remove(WEIGHTS),
        llama,
        FileNotFoundError,
        rf"holds {CONFIG} but no {WEIGHTS}: the adapter was not saved completely.*re-save the adapter",
    ),
    (
        "config-n-blocks-string",
        "ether",
        set_config(n_blocks="4"),
        llama,
        ValueError,
        rf"{CONFIG}: `n_blocks` must be a positive integer, got '4'\. Correct the field in the file{RESAVE}",
    ),
    (
        "config-init-weights-string",
        "pedro",
        set_config(init_weights="no"),
        llama,
        ValueError,
        rf"{CONFIG}: `init_weights` must be True or False, got 'no'.*Pass a bool.*Correct the field in the file",
    ),
    (
        "config-target-modules-number",
        "ether",
        set_config(target_modules=5),
        llama,
        ValueError,
        rf"{CONFIG}: `target_modules` must be None or a list of names or a regex string, got 5.*Correct the field",
    ),
    (
        "config-bank-seed-string",
        "xpeft",
        set_config(bank_seed="0"),
        llama,
        ValueError,
        rf"{CONFIG}: `bank_seed` must be an integer, got '0'.*without quotes.*Correct the field in the file",
    ),
    (
        "config-vg-rank-bool",
        "pedro",
        set_config(vg_rank=True),
        llama,
        ValueError,
        rf"{CONFIG}: `vg_rank` must be an integer, got True.*Correct the field in the file",
    ),
    (
        "config-task-type-unknown",
        "ether",
        set_config(task_type="TRANSLATE"),
        llama,
        ValueError,
        rf"{CONFIG}: Invalid task type: 'TRANSLATE'.*Correct the field in the file",
    ),
]


@pytest.mark.parametrize(
    ("kind", "damage", "base", "error", "match"), [pytest.param(*case[1:], id=case[0]) for case in LOAD_CASES]
)
def test_loading_a_damaged_adapter_is_refused(folder_of, kind, damage, base, error, match):
    folder = folder_of(kind)
    damage(folder)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base(), folder)


# -- reading a damaged adapter_config.json directly ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "text", "match"),
    [
        pytest.param(
            EtherConfig, '{"peft_type": "ETHER", ', rf"{CONFIG} is not valid JSON.*Fix the JSON{RESAVE}", id="json-cut"
        ),
        pytest.param(PedroConfig, "[1, 2]", rf"{CONFIG} holds a JSON list, not an object{RESAVE}", id="json-list"),
        pytest.param(
            XPeftConfig,
            '{"peft_type": "XPEFTS"}',
            rf"{CONFIG} names peft_type 'XPEFTS', which no installed peft method has.*Restore the `peft_type`",
            id="json-unknown-peft-type",
        ),
    ],
)
def test_reading_a_damaged_config_names_the_file(folder_of, config_class, text, match):
    folder = folder_of("ether")
    (folder / CONFIG).write_text(text)
    with pytest.raises(ValueError, match=match):
        config_class.from_pretrained(folder)


# -- D. config types and size bounds ------------------------------------------------------------------------------

BOOL = r"must be True or False, got {}.*Pass a bool"
INT = r"must be an integer, got {}.*Pass a whole number"
NAMES = r"`{}` must be None or a list of names or a regex string, got 5 \(int\)\. Pass e\.g\."


CONFIG_CASES = [
    (EtherConfig, {"init_weights": "no"}, "`init_weights` " + BOOL.format("'no'")),
    (PedroConfig, {"init_weights": "False"}, "`init_weights` " + BOOL.format("'False'")),
    (XPeftConfig, {"init_weights": 1}, "`init_weights` " + BOOL.format("1")),
    (EtherConfig, {"inference_mode": "yes"}, "`inference_mode` " + BOOL.format("'yes'")),
    (EtherConfig, {"fan_in_fan_out": 1}, r"`fan_in_fan_out` must be True, False or None, got 1"),
    (XPeftConfig, {"bank_size": True}, "`bank_size` " + INT.format("True")),
    (XPeftConfig, {"reduction_factor": True}, "`reduction_factor` " + INT.format("True")),
    (XPeftConfig, {"mask_type": "hard", "hard_k": True}, "`hard_k` " + INT.format("True")),
    (XPeftConfig, {"bank_seed": "1"}, "`bank_seed` " + INT.format("'1'")),
    (XPeftConfig, {"bank_seed": True}, "`bank_seed` " + INT.format("True")),
    (PedroConfig, {"vg_rank": True}, "`vg_rank` " + INT.format("True")),
    (EtherConfig, {"target_modules": 5}, NAMES.format("target_modules")),
    (PedroConfig, {"target_modules": 5}, NAMES.format("target_modules")),
    (XPeftConfig, {"target_modules": 5}, NAMES.format("target_modules")),
    (EtherConfig, {"exclude_modules": 5}, NAMES.format("exclude_modules")),
    (PedroConfig, {"exclude_modules": 5}, NAMES.format("exclude_modules")),
    (XPeftConfig, {"exclude_modules": 5}, NAMES.format("exclude_modules")),
    (EtherConfig, {"target_modules": ["q_proj", 3]}, r"`target_modules` must be None or a list of names"),
    (
        EtherConfig,
        {"target_modules": ["q_proj"], "layers_to_transform": [-1]},
        r"`layers_to_transform` must be .*integers >= 0.*got \[-1\]\. Pass e\.g\. \[0, 1\]",
    ),
    (
        XPeftConfig,
        {"target_modules": ["down_proj"], "layers_to_transform": ["0"]},
        r"`layers_to_transform` must be .*got \['0'\]\. Pass e\.g\. \[0, 1\]",
    ),
    (PedroConfig, {"layers_to_transform": True}, r"`layers_to_transform` must be .*got True"),
    (
        EtherConfig,
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": 3},
        r"`layers_pattern` must be None or a list of names or one name, got 3",
    ),
    (XPeftConfig, {"modules_to_save": "classifier"}, r"`modules_to_save` must be None or a list of names, got"),
    (XPeftConfig, {"bank_size": 10**9}, r"`bank_size`=1000000000 exceeds the limit of 100,000.*lower `bank_size`"),
    (XPeftConfig, {"bank": 5}, r"`bank` must be 'random' or the path of a bank file, got 5"),
]


def _config_id(config_class, kwargs):
    values = "-".join(f"{key}={value!r}" for key, value in kwargs.items())
    return f"{config_class.__name__.removesuffix('Config').lower()}-{values}"


@pytest.mark.parametrize(
    ("config_class", "kwargs", "match"),
    CONFIG_CASES,
    ids=[_config_id(config_class, kwargs) for config_class, kwargs, _ in CONFIG_CASES],
)
def test_config_values_of_the_wrong_type_are_refused(config_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config_class(**kwargs)


@pytest.mark.parametrize("vg_rank", [33, 10**7])
def test_pedro_rank_wider_than_the_hidden_size_is_refused_before_allocating(vg_rank):
    with pytest.raises(ValueError, match=rf"`vg_rank`={vg_rank} exceeds the hidden size d=32.*at most 32"):
        get_peft_model(llama(), PedroConfig(vg_rank=vg_rank, task_type="CAUSAL_LM"))


def test_xpeft_bank_above_the_bound_is_refused_before_drawing(monkeypatch):
    from xpeft.x_peft import bank

    monkeypatch.setattr(bank, "MAX_BANK_BYTES", 2**20)
    drawn = []
    monkeypatch.setattr(bank, "random_bank_layer", lambda *args: drawn.append(args))
    base = llama()
    with pytest.raises(
        ValueError,
        match=r"bank would take 4\.2 MiB \(1000 adapters for each of 2 layers\), above "
        r"`xpeft.x_peft.bank.MAX_BANK_BYTES` = 1\.0 MiB\. Lower `bank_size` or raise `reduction_factor`.*raise the "
        r"bound",
    ):
        get_peft_model(base, XPeftConfig(bank_size=1000, reduction_factor=4))
    assert drawn == []
    assert not any("xpeft" in name for name, _ in base.named_modules())


# -- a failed load leaves nothing behind --------------------------------------------------------------------------


def test_a_load_that_fails_its_checks_removes_the_new_adapter(folder_of):
    folder = folder_of("ether_plus")
    set_config(variant="ether")(folder)
    model = get_peft_model(llama(), EtherConfig(target_modules=["q_proj"], n_blocks=4)).eval()
    inputs = make_inputs("llama")
    before = model(**inputs).logits
    with pytest.raises(ValueError, match=rf"{WEIGHTS} holds 12 tensor\(s\).*no place for{CAUSE}"):
        model.load_adapter(folder, adapter_name="tenant")
    assert set(model.peft_config) == {"default"}
    with pytest.raises(ValueError, match="Unknown adapter name"):
        model(**inputs, adapter_names=["tenant"] * 3)
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)



# -- PEDRO's per-call prompt arguments (checked before any generator runs) ----------------------------------------------


def _pedro_for_prompts():
    from test_pedro import perturbed

    return perturbed(make_model("llama"))


def _prompt_inputs():
    inputs = make_inputs("llama", batch=2, seq_len=6)
    inputs.pop("labels", None)
    inputs["attention_mask"][:] = 1
    inputs["attention_mask"][1, :2] = 0  # sample 1 is left-padded: 4 real tokens
    return inputs


PROMPT_CASES = {
    "lengths_too_few": ({"prompt_lengths": [3]}, ValueError, r"`prompt_lengths` must have one entry per sample \(2\)"),
    "lengths_too_many": (
        {"prompt_lengths": torch.tensor([3, 3, 3])},
        ValueError,
        r"one entry per sample \(2\), got shape \[3\]",
    ),
    "lengths_zero": ({"prompt_lengths": [0, 2]}, ValueError, r"`prompt_lengths\[0\]` is 0.*between 1 and"),
    "lengths_negative": ({"prompt_lengths": [2, -1]}, ValueError, r"`prompt_lengths\[1\]` is -1.*between 1 and"),
    "lengths_beyond_real_tokens": (
        {"prompt_lengths": [2, 5]},
        ValueError,
        r"`prompt_lengths\[1\]` is 5, but sample 1 has 4 non-padding tokens",
    ),
    "lengths_float": ({"prompt_lengths": [2.0, 3.0]}, ValueError, r"`prompt_lengths` must hold integers"),
    "lengths_2d": ({"prompt_lengths": [[2], [3]]}, ValueError, r"one entry per sample \(2\), got shape \[2, 1\]"),
    "mask_all_zero": (
        {"prompt_mask": torch.zeros(2, 6, dtype=torch.bool)},
        ValueError,
        r"marks no \(non-padding\) prompt token in sample\(s\) \[0, 1\].*at least one prompt token",
    ),
    "mask_only_padding": (
        {"prompt_mask": torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)},
        ValueError,
        r"sample\(s\) \[1\]",
    ),
    "mask_wrong_shape": (
        {"prompt_mask": torch.ones(2, 5, dtype=torch.bool)},
        ValueError,
        r"prompt mask has shape \(2, 5\) but the input has shape \(2, 6\).*one entry per input token",
    ),
    "mask_not_binary": ({"prompt_mask": torch.full((2, 6), 2)}, ValueError, r"bool \(or 0/1 integer\) tensor"),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_pedro_prompt_arguments(case):
    kwargs, error, match = PROMPT_CASES[case]
    model = _pedro_for_prompts()
    with pytest.raises(error, match=match):
        model(**_prompt_inputs(), **kwargs)


def test_pedro_prompt_arguments_on_a_continued_cache():
    model = _pedro_for_prompts()
    inputs = _prompt_inputs()
    with torch.no_grad():
        cache = kv_cache_of(model(**inputs, use_cache=True))
        with pytest.raises(ValueError, match="reuses that prompt's vectors; drop them here"):
            model(input_ids=inputs["input_ids"][:, :1], past_key_values=cache, prompt_lengths=[1, 1])


def test_pedro_foreign_cache():
    """A KV cache that no prompt forward of this PEDRO model started has no vectors to continue."""
    model = _pedro_for_prompts()
    inputs = _prompt_inputs()
    with torch.no_grad():
        cache = kv_cache_of(make_model("llama")(input_ids=inputs["input_ids"], use_cache=True))
        with pytest.raises(ValueError, match="no vectors for it.*not started by a prompt forward of this PEDRO model"):
            model(input_ids=inputs["input_ids"][:, :1], past_key_values=cache)
