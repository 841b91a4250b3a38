"""Training-step time of ETHER / ETHER+ on convolutions against peft LoRA, OFT and HRA, in one run.

A seeded ResNet built from transformers' `ResNetConfig` (basic blocks, widths 64-128-256-512, one block per stage),
fp32, CPU, one fixed batch of images; every method adapts the same 3×3 convolutions of the encoder (fan-ins 576 to
4608). ETHER transforms the flattened filters at every forward (`EtherConv`), as peft's HRA does; peft's OFT rotates
unfolded input patches and folds them back; LoRA adds its low-rank convolution pair. The methods are built side by
side in one process and timed one step each in turn (`bench_ether.run_interleaved`); ratios are medians of same-cycle
ratios. Issue 4 sets no target for convolutions: the script reports, it does not judge.

    PYTHONPATH=src python benchmarks/bench_ether_conv.py           # → benchmarks/results/ether_conv.json
    PYTHONPATH=src python benchmarks/bench_ether_conv.py --quick   # smoke run → ether_conv_quick.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ether import RESULTS, machine_info, run_interleaved, same_cycle_ratio, write_report  # noqa: E402

# The last stage sees image / 32 pixels a side; peft's OFT needs at least the kernel's 3 (it unfolds without padding).
FULL = {"widths": [64, 128, 256, 512], "batch": 8, "image": 128, "labels": 10}
QUICK = {"widths": [8, 16, 32, 64], "batch": 2, "image": 96, "labels": 10}
TARGET = r".*layer\.\d\.convolution"  # the two 3×3 convolutions of every basic block
METHODS = ("lora_r8", "oft", "hra_r8", "full_ft", "ether", "ether_plus")
N_BLOCKS = 32  # EtherConfig's default


def build_model(shape: dict):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=shape["widths"][0],
        hidden_sizes=shape["widths"],
        depths=[1] * len(shape["widths"]),
        layer_type="basic",
        num_labels=shape["labels"],
    )
    return ResNetForImageClassification(config)


def prepare(method: str, model, n_blocks: int):
    import peft

    import xpeft  # noqa: F401  (registers the "ether" peft type)

    configs = {
        "lora_r8": lambda: peft.LoraConfig(r=8, target_modules=TARGET),
        "oft": lambda: peft.OFTConfig(target_modules=TARGET),
        "hra_r8": lambda: peft.HRAConfig(r=8, target_modules=TARGET),
        "ether": lambda: xpeft.EtherConfig(target_modules=TARGET, n_blocks=n_blocks, variant="ether"),
        "ether_plus": lambda: xpeft.EtherConfig(target_modules=TARGET, n_blocks=n_blocks, variant="ether_plus"),
    }
    return model if method == "full_ft" else peft.get_peft_model(model, configs[method]())


def make_step(method: str, shape: dict, n_blocks: int):
    """`(step, trainable_params)`: `step()` runs forward + backward + AdamW on one fixed batch, returns seconds."""
    # Batch norm stays in eval mode (running statistics fixed), as when fine-tuning a pretrained CNN.
    model = prepare(method, build_model(shape), n_blocks).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(shape["batch"], 3, shape["image"], shape["image"], generator=generator)
    labels = torch.randint(0, shape["labels"], (shape["batch"],), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, two cycles: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cycles", type=int, default=None, help="timed interleaved cycles (default 5, quick 2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    n_blocks = 4 if args.quick else N_BLOCKS
    cycles = args.cycles if args.cycles is not None else (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    print(f"shape {shape}, n_blocks {n_blocks}, {args.threads} thread(s), load {load_before}")
    built = {method: make_step(method, shape, n_blocks) for method in METHODS}
    times, faults = run_interleaved({method: step for method, (step, _) in built.items()}, warmup=1, cycles=cycles)

    results = {
        method: {
            "step_s_median": statistics.median(times[method]),
            "step_s_all": times[method],
            "minor_page_faults_per_step": statistics.median(faults[method]),
            "trainable_params": n,
        }
        for method, (_, n) in built.items()
    }
    ratios = {
        f"{ether}/{base}": same_cycle_ratio(times, ether, base)
        for ether in ("ether", "ether_plus")
        for base in METHODS
        if not base.startswith("ether")
    }
    print("\nmedian step time (s) and trainable parameters:")
    for method, r in results.items():
        print(f"  {method:12s} {r['step_s_median']:7.3f}  {r['trainable_params']:>12,d}")
    print("\nratios (ETHER step time / baseline step time):")
    for key, value in ratios.items():
        print(f"  {key:22s} {value:6.3f}")

    report = {
        "shape": shape,
        "quick": args.quick,
        "n_blocks": n_blocks,
        "target_modules": TARGET,
        "timed_cycles": cycles,
        "torch_threads": args.threads,
        "dtype": "float32",
        "step": "forward + backward + AdamW step, cross-entropy on one fixed batch, batch norm in eval mode",
        "peft_defaults": (
            "OFTConfig() defaults (on Conv2d, peft 0.21 rotates unfolded input patches and folds them back); "
            "LoraConfig(r=8); HRAConfig(r=8) (weight side, like ETHER here)"
        ),
        "machine": machine_info(load_before),
        "results": results,
        "ratios": ratios,
    }
    write_report(report, args.out or RESULTS / ("ether_conv_quick.json" if args.quick else "ether_conv.json"))


if __name__ == "__main__":
    main()
