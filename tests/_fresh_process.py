"""Run in a fresh Python process by the contract suite: load a saved adapter with peft's own API, write logits.

Usage: python _fresh_process.py REGISTER_MODULE MODEL_NAME ADAPTER_DIR OUTPUT_FILE [ADAPTER_NAME ...]
REGISTER_MODULE is imported first (e.g. `xpeft`), as a user would; every extra ADAPTER_NAME is loaded from the
sub-folder of that name with `load_adapter` and its logits are written too.
"""

import importlib
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file

from models import make_inputs, make_model


def main(register_module: str, model_name: str, adapter_dir: str, output_file: str, *extra: str) -> None:
    importlib.import_module(register_module)
    model = PeftModel.from_pretrained(make_model(model_name), adapter_dir).eval()
    inputs = make_inputs(model_name)
    outputs = {}
    with torch.no_grad():
        outputs["default"] = model(**inputs).logits
        for name in extra:
            model.load_adapter(f"{adapter_dir}/{name}", adapter_name=name)
            model.set_adapter(name)
            outputs[name] = model(**inputs).logits
    save_file({k: v.contiguous() for k, v in outputs.items()}, output_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
