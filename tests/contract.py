"""The contract every xpeft method honours through peft's own API, as one reusable test class.

Plug a method in with one subclass in its test module::

    class TestEtherContract(ContractSuite):
        models = ("llama", "bert", "gpt2")
        mergeable = True

        def make_config(self, model_name):
            return EtherConfig(target_modules=..., task_type=task_type(model_name))

`conftest.py` parametrizes every test below over `models`. The checks compare against the base model and against
each adapter run on its own, never against the implementation's internals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file

from models import make_inputs, make_model

TESTS_DIR = Path(__file__).resolve().parent


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def each_sample_alone(model, inputs, adapter_names, run=logits, **kwargs) -> torch.Tensor:
    """`run` on one sample at a time with its adapter set active (or disabled for "__base__"), concatenated."""
    rows = []
    for index, name in enumerate(adapter_names):
        sample = {key: value[index : index + 1] for key, value in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run(model, sample, **kwargs))
        else:
            model.set_adapter(name)
            rows.append(run(model, sample, **kwargs))
    return torch.cat(rows)


class ContractSuite:
    """Generic peft-integration checks; subclasses set the attributes and `make_config`."""

    models: tuple[str, ...] = ()
    register_module: str = "xpeft"  # imported in the fresh process before loading
    mergeable: bool = True
    merge_atol: float = 1e-5
    perturb_std: float = 0.5

    def make_config(self, model_name: str):
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------

    def adapter_parameters(self, model, adapter_name: str) -> list[torch.nn.Parameter]:
        """The parameters of `adapter_name` in every tuner layer, found through the layers' declared names."""
        params = []
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name in container:
                    entry = container[adapter_name]
                    params.extend([entry] if isinstance(entry, torch.nn.Parameter) else entry.parameters())
        return params

    def head_wrappers(self, model) -> list[AuxiliaryTrainingWrapper]:
        """peft's wrappers of `modules_to_save` heads (e.g. the classifier that SEQ_CLS adds)."""
        return [
            m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper) and hasattr(m, "modules_to_save")
        ]

    def head_parameters(self, model, adapter_name: str) -> list[torch.nn.Parameter]:
        """The adapter's own copies of the `modules_to_save` heads."""
        return [
            param
            for wrapper in self.head_wrappers(model)
            if adapter_name in wrapper.modules_to_save
            for param in wrapper.modules_to_save[adapter_name].parameters()
        ]

    def perturb(self, model, adapter_name: str, seed: int) -> None:
        """Move an adapter (and its own heads) away from its init so that its effect, and any mix-up, is visible."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.adapter_parameters(model, adapter_name):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(self.perturb_std * noise.to(param.device, param.dtype))
            for param in self.head_parameters(model, adapter_name):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(0.5 * noise.to(param.device, param.dtype))

    def peft_model(self, model_name: str, seed: int = 0):
        model = get_peft_model(make_model(model_name), self.make_config(model_name))
        self.perturb(model, "default", seed=100 + seed)
        return model.eval()

    # -- the contract ------------------------------------------------------------------------------------------

    def test_forward_shape_and_effect(self, model_name):
        inputs = make_inputs(model_name)
        base = logits(make_model(model_name), inputs)
        adapted = logits(self.peft_model(model_name), inputs)
        assert adapted.shape == base.shape
        assert torch.isfinite(adapted).all()
        assert not torch.allclose(adapted, base, atol=1e-4), "the adapter has no effect on the output"

    def test_only_adapter_parameters_are_trainable(self, model_name):
        model = get_peft_model(make_model(model_name), self.make_config(model_name))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        adapter = {id(p) for p in self.adapter_parameters(model, "default")}
        assert adapter, "no adapter parameters found in the tuner layers"
        assert all(p.requires_grad for p in self.adapter_parameters(model, "default"))
        prefix = model.base_model.prefix
        for name in trainable:
            assert prefix in name or "modules_to_save" in name, f"{name} is trainable but is not an adapter parameter"
        trainable_count, _ = model.get_nb_trainable_parameters()
        assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad)

    def test_disable_adapter_gives_base_output(self, model_name):
        inputs = make_inputs(model_name)
        base = logits(make_model(model_name), inputs)
        model = self.peft_model(model_name)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)
        assert not torch.allclose(logits(model, inputs), base, atol=1e-4)

    def test_state_dict_keys_follow_peft_convention(self, model_name):
        model = self.peft_model(model_name)
        state_dict = get_peft_model_state_dict(model)
        prefix = model.base_model.prefix
        assert state_dict
        for key in state_dict:
            assert key.startswith("base_model.model."), key
            assert ".default" not in key, f"adapter name left in saved key {key}"
        assert any(prefix in key for key in state_dict)

    def test_save_and_load_in_fresh_process(self, model_name, tmp_path):
        inputs = make_inputs(model_name)
        model = self.peft_model(model_name)
        model.add_adapter("other", self.make_config(model_name))
        self.perturb(model, "other", seed=7)
        expected = {"default": logits(model, inputs)}
        model.set_adapter("other")
        expected["other"] = logits(model, inputs)
        model.save_pretrained(tmp_path / "adapter")

        saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
        assert "adapter_model.safetensors" in saved and "adapter_model.bin" not in saved
        output_file = tmp_path / "outputs.safetensors"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, str(TESTS_DIR / "_fresh_process.py"), self.register_module, model_name]
        command += [str(tmp_path / "adapter"), str(output_file), "other"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = load_file(output_file)
        for name, tensor in expected.items():
            torch.testing.assert_close(
                loaded[name], tensor, rtol=0, atol=0, msg=lambda detail, name=name: f"adapter {name!r} differs: {detail}"
            )

    def test_multiple_adapters_add_set_delete(self, model_name):
        inputs = make_inputs(model_name)
        model = self.peft_model(model_name)
        first = logits(model, inputs)
        model.add_adapter("other", self.make_config(model_name))
        added = self.adapter_parameters(model, "other")
        assert added and not any(p.requires_grad for p in added), "an inactive adapter trains"
        self.perturb(model, "other", seed=7)
        assert logits(model, inputs).equal(first), "adding an adapter changed the active one"
        model.set_adapter("other")
        assert model.active_adapter == "other"
        other = logits(model, inputs)
        assert not torch.allclose(other, first, atol=1e-4)
        assert all(p.requires_grad for p in self.adapter_parameters(model, "other"))
        assert not any(p.requires_grad for p in self.adapter_parameters(model, "default"))
        model.set_adapter("default")
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        assert not self.adapter_parameters(model, "other")
        torch.testing.assert_close(logits(model, inputs), first, rtol=0, atol=0)

    def test_unknown_adapter_name_errors(self, model_name):
        model = self.peft_model(model_name)
        with pytest.raises(ValueError, match="nope"):
            model.set_adapter("nope")
        inputs = make_inputs(model_name)
        with pytest.raises(ValueError, match="Unknown adapter name.*nope"):
            logits(model, inputs, adapter_names=["default", "nope", "default"])
        with pytest.raises(ValueError, match="training mode"):
            model.train()
            model(**inputs, adapter_names=["default"] * len(inputs["input_ids"]))

    def test_mixed_batch_equals_each_sample_alone(self, model_name):
        inputs = make_inputs(model_name)
        model = self.peft_model(model_name)
        model.add_adapter("other", self.make_config(model_name))
        self.perturb(model, "other", seed=7)
        names = ["other", "__base__", "default"]
        if any(not isinstance(m.original_module, torch.nn.Linear) for m in self.head_wrappers(model)):
            # peft routes per-sample heads only for plain layers (RobertaClassificationHead is not), as for LoRA.
            with pytest.raises(TypeError, match="Mixed batching is only supported"):
                logits(model, inputs, adapter_names=names)
            return
        mixed = logits(model, inputs, adapter_names=names)
        torch.testing.assert_close(mixed, each_sample_alone(model, inputs, names), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="one adapter name"):
            logits(model, inputs, adapter_names=["default"])

    def test_merge_contract(self, model_name):
        inputs = make_inputs(model_name)
        model = self.peft_model(model_name)
        if not self.mergeable:
            with pytest.raises(ValueError, match="cannot be merged"):
                model.merge_and_unload()
            with pytest.raises(ValueError, match="cannot be merged"):
                model.merge_adapter()
            return
        unmerged = logits(model, inputs)
        base_weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
        model.merge_adapter()
        torch.testing.assert_close(logits(model, inputs), unmerged, rtol=self.merge_atol, atol=self.merge_atol)
        model.unmerge_adapter()
        restored = model.get_base_model().state_dict()
        for key, value in base_weights.items():
            torch.testing.assert_close(restored[key], value, rtol=1e-5, atol=1e-5, msg=f"{key} not restored")
        merged = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=self.merge_atol, atol=self.merge_atol)
