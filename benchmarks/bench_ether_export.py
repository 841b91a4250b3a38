"""Rank and file size of `xpeft.ether.to_lora` exports against the ETHER adapter file (issue 18, item 1).

A randomly initialised Llama with SmolLM2-135M's geometry (hidden 576, intermediate 1536, 30 layers, 9 query heads,
3 key/value heads of 64: q/o 576→576, k/v 576→192, gate/up 576→1536, down 1536→576; the vocabulary is cut to 1024,
which changes no adapter) in bfloat16, as SmolLM2 ships. For each target set and variant (n_blocks=32, the default)
the ETHER adapter is saved with `save_pretrained` (its vectors are float32 parameters) and exported with `to_lora`
(default dtype: the base's bfloat16) and with `dtype=torch.float32`. peft LoRA r=8 on the same targets is listed for
scale. Sizes are those of `adapter_model.safetensors`.

    PYTHONPATH=src python benchmarks/bench_ether_export.py            # → benchmarks/results/ether_export.json
    PYTHONPATH=src python benchmarks/bench_ether_export.py --quick    # 2 layers, → ether_export_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
VARIANTS = ("ether", "ether_plus", "ether_plus_one_sided")
N_BLOCKS = 32


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def weights_size(folder: str) -> int:
    return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def measure_ether(layers: int, targets, variant: str, scratch: str) -> dict:
    from peft import get_peft_model

    from xpeft import EtherConfig
    from xpeft.ether import EtherLayer, to_lora

    model = get_peft_model(
        build_model(layers), EtherConfig(target_modules=targets, n_blocks=N_BLOCKS, variant=variant, init_weights=False)
    )
    n_layers = sum(isinstance(module, EtherLayer) for module in model.modules())
    ether_dir, lora_dir, lora32_dir = (os.path.join(scratch, name) for name in ("ether", "lora", "lora32"))
    model.save_pretrained(ether_dir)
    start = time.perf_counter()
    config = to_lora(model, lora_dir)
    export_seconds = time.perf_counter() - start
    to_lora(model, lora32_dir, dtype=torch.float32)
    ranks = sorted({config.r, *config.rank_pattern.values()})
    return {
        "adapted_layers": n_layers,
        "ether_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "ether_bytes": weights_size(ether_dir),
        "lora_r": config.r,
        "lora_ranks": ranks,
        "rank_pattern_entries": len(config.rank_pattern),
        "lora_bf16_bytes": weights_size(lora_dir),
        "lora_fp32_bytes": weights_size(lora32_dir),
        "export_seconds": round(export_seconds, 2),
    }


def measure_lora_r8(layers: int, targets, scratch: str) -> dict:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(layers), LoraConfig(r=8, target_modules=targets))
    model.save_pretrained(os.path.join(scratch, "lora_r8"))
    return {"lora_r8_bytes": weights_size(os.path.join(scratch, "lora_r8"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 30")
    args = parser.parse_args()
    layers = 2 if args.quick else 30
    torch.set_num_threads(1)
    results = {"geometry": "SmolLM2-135M (bf16 base)", "layers": layers, "n_blocks": N_BLOCKS, "rows": []}
    for target_name, targets in TARGETS.items():
        with tempfile.TemporaryDirectory() as scratch:
            baseline = measure_lora_r8(layers, targets, scratch)
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as scratch:
                row = {"targets": target_name, "variant": variant, **measure_ether(layers, targets, variant, scratch)}
            row.update(baseline)
            row["lora_bf16_over_ether"] = round(row["lora_bf16_bytes"] / row["ether_bytes"], 2)
            results["rows"].append(row)
            print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("ether_export_quick.json" if args.quick else "ether_export.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
