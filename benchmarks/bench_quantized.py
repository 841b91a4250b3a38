"""Training-step time and peak memory of ETHER / ETHER+ against peft LoRA on the same 4-bit base (issue 20): QLoRA's
set-up, a Llama-like model whose decoder linear layers are bitsandbytes `Linear4bit` (nf4, float32 compute, blocks of
64), the embeddings and LM head in float32, 'all-linear' targets.

Phase 1 builds every method on its own copy of the quantized base in one process and times one step (forward + backward
+ AdamW) of each in turn, rotating the order, so that drifting machine load hits all of them alike; ratios are medians
of same-cycle ratios with a bootstrap interval. Phase 2 runs every method alone in its own process to read its peak
memory (VmHWM, reset right after building the model; reported as the peak during the steps minus the RSS after
building, and as the absolute peak).

    PYTHONPATH=src python benchmarks/bench_quantized.py           # → benchmarks/results/quantized.json
    PYTHONPATH=src python benchmarks/bench_quantized.py --quick   # smoke run, in-process → quantized_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ether import (  # noqa: E402
    RESULTS,
    build_model,
    machine_info,
    measure_alone,
    same_cycle_ratio,
    same_cycle_ratio_interval,
    write_report,
)

FULL = {"hidden": 1024, "intermediate": 2816, "layers": 2, "heads": 16, "vocab": 8192, "batch": 4, "seq": 128}
QUICK = {"hidden": 128, "intermediate": 256, "layers": 1, "heads": 4, "vocab": 512, "batch": 2, "seq": 16}
METHODS = ("lora_r8", "ether", "ether_plus")
BASELINE = "lora_r8"
N_BLOCKS = 32  # EtherConfig's default


def quantize_4bit(model: nn.Module) -> nn.Module:
    """Replace every linear layer of the decoder blocks by a bitsandbytes nf4 `Linear4bit` holding the same weights."""
    import bitsandbytes as bnb

    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    layer = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=torch.float32, quant_type="nf4",
                    )  # fmt: skip
                    layer.load_state_dict(child.state_dict())
                    setattr(parent, name, layer.to("cpu"))  # bitsandbytes quantizes when the weight moves
    return model


def prepare(method: str, model: nn.Module) -> nn.Module:
    import peft

    import xpeft

    if method == "lora_r8":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        config = xpeft.EtherConfig(
            n_blocks=N_BLOCKS, variant=method, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    return peft.get_peft_model(quantize_4bit(model), config)


def make_step(method: str, shape: dict):
    """Build `method` on a fresh 4-bit base with its optimizer and batch; return `(step, trainable_params)`."""
    model = prepare(method, build_model(shape)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, sum(p.numel() for p in params)


def run_interleaved(steps: dict, warmup: int, cycles: int) -> dict[str, list[float]]:
    methods = list(steps)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for cycle in range(warmup + cycles):
        order = methods[cycle % len(methods) :] + methods[: cycle % len(methods)]
        for method in order:
            elapsed = steps[method]()
            if cycle >= warmup:
                times[method].append(elapsed)
        if cycle >= warmup:
            print(f"  cycle {cycle - warmup + 1}/{cycles}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in methods))
    return times


def alone(method: str, shape: dict, args) -> dict:
    """`method` alone in a fresh process (peak memory), or in this one for --quick."""
    if args.quick:
        return run_one_4bit(method, shape, 1, args.alone_steps, args.threads)
    cmd = [sys.executable, __file__, "--child", method, "--alone-steps", str(args.alone_steps)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one_4bit(method: str, shape: dict, warmup: int, steps: int, threads: int) -> dict:
    """`method` alone: peak memory during its steps (as `bench_ether.run_one`, on the 4-bit base)."""
    torch.set_num_threads(threads)
    result = measure_alone(*make_step(method, shape), warmup, steps)
    del result["step_s_all"]  # the report keeps the median only
    return result


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline > 0 else None  # a quick run's increase can round to 0 MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, everything in-process: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cycles", type=int, default=15, help="interleaved timing cycles (default 15)")
    parser.add_argument("--alone-steps", type=int, default=3, help="steps of each method alone, for memory")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(run_one_4bit(args.child, shape, 1, args.alone_steps, args.threads)))
        return
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    print(f"shape {shape}, threads {args.threads}")
    steps, params = {}, {}
    for method in METHODS:
        steps[method], params[method] = make_step(method, shape)
    times = run_interleaved(steps, warmup=2, cycles=args.cycles)
    del steps
    results = {}
    for method in METHODS:
        memory = alone(method, shape, args)
        results[method] = {
            "trainable_params": params[method],
            "step_s_median": statistics.median(times[method]),
            "step_s_all": times[method],
            "peak_rss_mb": memory["peak_rss_mb"],
            "peak_rss_increase_mb": memory["peak_rss_increase_mb"],
        }
        print(
            f"  {method:12s} params {params[method]:>9,d}  step {results[method]['step_s_median']:.3f} s  "
            f"peak RSS +{memory['peak_rss_increase_mb']:.1f} MB (abs {memory['peak_rss_mb']:.1f} MB)"
        )
    ratios = {}
    for method in METHODS:
        if method == BASELINE:
            continue
        ratios[f"{method} / {BASELINE}"] = {
            "step_time": same_cycle_ratio(times, method, BASELINE),
            "step_time_interval_95": same_cycle_ratio_interval(times, method, BASELINE),
            "peak_rss_increase": _ratio(
                results[method]["peak_rss_increase_mb"], results[BASELINE]["peak_rss_increase_mb"]
            ),
            "peak_rss": _ratio(results[method]["peak_rss_mb"], results[BASELINE]["peak_rss_mb"]),
            "trainable_params": params[method] / params[BASELINE],
        }
        print(
            f"  {method} / {BASELINE}: " + ", ".join(f"{k} {v}" for k, v in ratios[f"{method} / {BASELINE}"].items())
        )
    import bitsandbytes

    report = {
        "benchmark": "ETHER / ETHER+ vs LoRA r=8 on a bitsandbytes nf4 (4-bit) base, training steps, CPU",
        "shape": shape,
        "targets": "all-linear (decoder blocks quantized; embeddings and LM head float32)",
        "n_blocks": N_BLOCKS,
        "threads": args.threads,
        "cycles": args.cycles,
        "timing": "interleaved in one process, order rotated per cycle; ratios are medians of same-cycle ratios",
        "memory": (
            "VmHWM (peak RSS) of each method's own process, reset after building the model; increase = peak during "
            "1 warm-up + timed steps minus RSS after building"
        ),
        "machine": {**machine_info(load_before), "bitsandbytes": bitsandbytes.__version__},
        "results": results,
        "ratios": ratios,
    }
    write_report(report, args.out or RESULTS / ("quantized_quick.json" if args.quick else "quantized.json"))


if __name__ == "__main__":
    main()
