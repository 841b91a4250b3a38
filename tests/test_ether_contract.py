"""The shared peft contract (tests/contract.py) run on ETHER, ETHER+ and one-sided ETHER+."""

from __future__ import annotations

import torch

from contract import ContractSuite
from models import task_type
from xpeft import EtherConfig
from xpeft.ether import EtherLayer
from xpeft.ether.layer import UNMERGE_RTOL

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "bert": ["query", "value", "intermediate.dense"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "opt": ["q_proj", "fc1", "fc2"],
}


class EtherContract(ContractSuite):
    models = tuple(TARGETS)
    mergeable = True
    variant = "ether"

    def make_config(self, model_name):
        return EtherConfig(
            target_modules=TARGETS[model_name], n_blocks=4, variant=self.variant, task_type=task_type(model_name)
        )


class TestEtherContract(EtherContract):
    variant = "ether"


class TestEtherPlusContract(EtherContract):
    variant = "ether_plus"
    # Default contract noise (std 0.5 on vectors of norm ~0.4) makes û and v̂ nearly orthogonal in some blocks, where
    # H⁺ is nearly singular and unmerge may refuse on purpose (test_ether_unmerge.py tests that refusal). Training moves ETHER+
    # away from H⁺ = I (v̂ = −û) gradually, so a perturbation that keeps |û·v̂| moderate is the realistic case; it
    # still changes the logits far beyond the contract's 1e-4 threshold.
    perturb_std = 0.05
    models = ("llama", "gpt2")  # an nn.Linear and a Conv1D model; plain ETHER covers all five architectures


class TestEtherPlusOneSidedContract(EtherContract):
    variant = "ether_plus_one_sided"
    perturb_std = 0.05
    models = ("opt",)


def test_contract_perturbation_keeps_ether_plus_invertible():
    # Guards the choice above: the perturbed adapters must be invertible, else the merge contract would not be run.
    suite = TestEtherPlusContract()
    model = suite.peft_model("llama")
    layers = [m for m in model.modules() if isinstance(m, EtherLayer)]
    model.merge_adapter()
    assert layers and max(layer.unmerge_error() for layer in layers) <= UNMERGE_RTOL
    assert torch.isfinite(torch.cat([p.flatten() for p in suite.adapter_parameters(model, "default")])).all()
