"""The shared peft contract, run on X-PEFT with soft and hard masks over every test architecture."""

from contract import ContractSuite
from models import MODEL_FACTORIES, task_type
from xpeft import XPeftConfig


class TestXPeftSoftContract(ContractSuite):
    models = tuple(MODEL_FACTORIES)
    mergeable = False

    def make_config(self, model_name):
        # Default target_modules: each architecture's feed-forward output projection.
        return XPeftConfig(bank_size=6, reduction_factor=4, task_type=task_type(model_name))


class TestXPeftHardContract(TestXPeftSoftContract):
    # Hard masks share every code path with soft masks except the mask rule and the bit-packed payload, which do not
    # depend on the architecture: one encoder (BERT), GPT-2's Conv1D and Llama keep the suite within its time budget.
    # OPT's flattened rows with hard masks are covered by test_x_peft_profiles' mixed-batch test.
    models = ("bert", "gpt2", "llama")

    # Perturbing the logits by N(0, 0.5²) reshuffles the top-k choice, so the adapter visibly changes.
    def make_config(self, model_name):
        return XPeftConfig(
            bank_size=6, reduction_factor=4, mask_type="hard", hard_k=2, task_type=task_type(model_name)
        )
