"""xpeft adapters through transformers' own adapter API (`model.load_adapter(...)` on a plain transformers model).

What the installed versions give, measured with peft 0.21.2 (the latest release):
- transformers 5.23: every transformers-side adapter method works; ETHER and PEDRO load exactly, X-PEFT is refused
  by peft (its bank is shared state on the tuner, which `inject_adapter_in_model` cannot hold).
- transformers 5.24 and 5.25: `load_adapter` still loads (exactly), but every other adapter method (`set_adapter`,
  `active_adapters`, `disable_adapters`, `delete_adapter`, `add_adapter`, ...) raises "The version of PEFT you are
  using is not compatible, please use a version >= 0.22.0", for LoRA too: transformers requires peft 0.22, which
  is not released.
xpeft's documented path, `PeftModel.from_pretrained(base, folder)` after `import xpeft`, works on all of them. The
tests below decide from transformers' own `MIN_PEFT_VERSION` which behaviour to expect, and skip the other with the
reason.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from packaging import version
from peft import PeftModel, get_peft_model
from transformers.integrations import peft as transformers_peft

import xpeft  # noqa: F401
from models import make_inputs, make_model
from xpeft import EtherConfig, PedroConfig, XPeftConfig

CONFIGS = {
    "ether": lambda: EtherConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], n_blocks=4),
    "ether_plus": lambda: EtherConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], n_blocks=4, variant="ether_plus"
    ),
    "pedro": lambda: PedroConfig(task_type="CAUSAL_LM", vg_rank=4),
    "x_peft": lambda: XPeftConfig(task_type="CAUSAL_LM", bank_size=8),
}
MIN_PEFT = getattr(transformers_peft, "MIN_PEFT_VERSION", "0")
PEFT_TOO_OLD = version.parse(importlib.metadata.version("peft")) < version.parse(MIN_PEFT)
TOO_OLD_REASON = f"transformers wants peft >= {MIN_PEFT} for its adapter methods; peft {importlib.metadata.version('peft')} is installed"


def saved(method: str, folder) -> torch.Tensor:
    """Save a non-identity adapter of `method` to `folder`; return its logits."""
    model = get_peft_model(make_model("llama"), CONFIGS[method]()).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        logits = model(**make_inputs("llama")).logits
    model.save_pretrained(folder)
    return logits


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs("llama")).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_documented_path_loads_exactly_on_every_version(method, tmp_path):
    expected = saved(method, tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(logits_of(loaded), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["ether", "ether_plus", "pedro"])
def test_transformers_load_adapter_is_exact(method, tmp_path):
    expected = saved(method, tmp_path)
    base = make_model("llama")
    try:
        base.load_adapter(str(tmp_path))
    except ValueError as error:
        if "version of PEFT" not in str(error):
            raise
        pytest.skip(f"transformers' load_adapter refuses here ({error}); the documented path is tested above")
    torch.testing.assert_close(logits_of(base), expected, atol=0, rtol=0)


def test_transformers_load_adapter_refuses_x_peft_clearly(tmp_path):
    saved("x_peft", tmp_path)
    with pytest.raises(
        ValueError, match=r"does not support PeftType.XPEFT because it uses shared state.*get_peft_model"
    ):
        make_model("llama").load_adapter(str(tmp_path))


@pytest.mark.skipif(PEFT_TOO_OLD, reason=TOO_OLD_REASON)
def test_transformers_adapter_switching_is_exact(tmp_path):
    expected = saved("ether", tmp_path / "a")
    base_logits = logits_of(make_model("llama"))
    model = make_model("llama")
    model.load_adapter(str(tmp_path / "a"), adapter_name="a")
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    torch.testing.assert_close(logits_of(model), expected, atol=0, rtol=0)
    model.disable_adapters()
    torch.testing.assert_close(logits_of(model), base_logits, atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits_of(model), expected, atol=0, rtol=0)


@pytest.mark.skipif(not PEFT_TOO_OLD, reason=f"peft is new enough for transformers' adapter methods (>= {MIN_PEFT})")
def test_transformers_adapter_methods_refuse_an_old_peft_by_name(tmp_path):
    saved("ether", tmp_path)
    model = make_model("llama")
    model.load_adapter(str(tmp_path))
    with pytest.raises(ValueError, match=rf"PEFT you are using is not compatible, please use a version >= {MIN_PEFT}"):
        model.set_adapter("default")
