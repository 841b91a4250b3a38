"""The shared contract run on the test-only tuner: proves xpeft's peft plumbing before any real method."""

import dummy_tuner
from contract import ContractSuite
from models import MODEL_FACTORIES, task_type

TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj"],
    "bert": ["query", "value", "intermediate.dense"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "opt": ["q_proj", "fc1"],
}


class TestFoundationContract(ContractSuite):
    models = tuple(MODEL_FACTORIES)
    register_module = "dummy_tuner"
    mergeable = True

    def make_config(self, model_name):
        return dummy_tuner.DummyConfig(target_modules=TARGETS[model_name], task_type=task_type(model_name))
