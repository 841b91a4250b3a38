"""The shared peft-integration contract run on PEDRO (unmergeable: merge must refuse)."""

from contract import ContractSuite
from models import task_type
from xpeft import PedroConfig


class TestPedroContract(ContractSuite):
    models = ("llama", "opt", "gpt2", "bert")
    mergeable = False

    def make_config(self, model_name):
        return PedroConfig(vg_rank=4, task_type=task_type(model_name))
